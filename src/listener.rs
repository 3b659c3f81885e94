//! Listening sockets: what the builder asked for, binding it, and the address each one ended up
//! with. Shared by the primary (which accepts, round-robin) and the workers (which accept,
//! shared schedule). UDP sockets are bound by the primary and read only by the workers, in
//! every schedule.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode};
use rustix::net::SocketType;

use crate::error::{Call, Result};

/// The address a listener is bound to.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    /// A TCP socket (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(std::os::unix::net::SocketAddr),
    /// A UDP socket (IPv4 or IPv6), shared by every worker
    /// ([`Builder::listen_udp`](crate::Builder::listen_udp)). Displayed as `udp:ADDR`.
    ///
    /// ```
    /// let a = forkcluster::ListenAddr::Udp("127.0.0.1:5353".parse().unwrap());
    /// assert_eq!(a.to_string(), "udp:127.0.0.1:5353");
    /// ```
    Udp(SocketAddr),
}

impl core::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Udp(a) => write!(f, "udp:{a}"),
            ListenAddr::Unix(a) => match a.as_pathname() {
                Some(p) => write!(f, "unix:{}", p.display()),
                None => f.write_str("unix:(unnamed)"),
            },
        }
    }
}

/// The kind of socket a listener is: a stream socket that accepts (TCP, Unix) or a datagram
/// socket that every worker reads (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Tcp,
    Unix,
    Udp,
}

impl Family {
    /// A listening stream socket, on which connections are accepted (not UDP).
    pub(crate) fn accepts(self) -> bool {
        self != Family::Udp
    }
}

/// A worker's socket for one listener, typed, so that the worker can lend it out as the std
/// type (`Worker::tcp_listener`, ...) without `unsafe`.
#[derive(Debug)]
pub(crate) enum Sock {
    Tcp(TcpListener),
    Unix(UnixListener),
    Udp(UdpSocket),
}

impl Sock {
    pub(crate) fn new(fd: OwnedFd, family: Family) -> Sock {
        match family {
            Family::Tcp => Sock::Tcp(fd.into()),
            Family::Unix => Sock::Unix(fd.into()),
            Family::Udp => Sock::Udp(fd.into()),
        }
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
            Sock::Udp(s) => s.as_fd(),
        }
    }
}

/// A bound, listening socket of the cluster.
#[derive(Debug)]
pub(crate) struct Listener {
    /// `None` once the cluster stopped accepting (new clients are refused at once).
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) family: Family,
    pub(crate) addr: ListenAddr,
    /// A Unix path this cluster created and removes when the primary is dropped (or the
    /// cluster stops): its device and inode, so that a file someone else put there since is
    /// left alone.
    pub(crate) unlink: Option<(PathBuf, u64, u64)>,
}

/// What the builder was asked to listen on.
pub(crate) enum Spec {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Udp(SocketAddr),
    Bound(OwnedFd, Family),
}

impl Spec {
    /// A socket the application bound itself: the family is read from the socket (a datagram
    /// socket is UDP; `bind` checks that it is one of the kinds the cluster serves).
    pub(crate) fn bound(fd: OwnedFd) -> Spec {
        let family = match rustix::net::getsockname(&fd).map(|a| a.address_family()) {
            Ok(rustix::net::AddressFamily::UNIX) => Family::Unix,
            _ if rustix::net::sockopt::socket_type(&fd) == Ok(rustix::net::SocketType::DGRAM) => {
                Family::Udp
            }
            _ => Family::Tcp,
        };
        Spec::Bound(fd, family)
    }
}

/// How the cluster binds its sockets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BindOptions {
    pub(crate) backlog: i32,
    pub(crate) defer_accept: Option<u32>,
    /// The mode of the Unix socket files the cluster creates (else the umask's).
    pub(crate) unix_mode: Option<u32>,
    /// TCP sockets the cluster binds get `SO_REUSEPORT` (the reuseport schedule), so that
    /// each worker seat can bind one more.
    pub(crate) reuseport: bool,
    /// Stream listeners are nonblocking (else blocking: `Builder::app_accepts`).
    pub(crate) nonblocking: bool,
}

/// Binds (unless the socket came bound), listens, and reads back the address.
// `st_dev`/`st_ino` are not u64 on every target.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn bind(spec: Spec, opts: BindOptions) -> Result<Listener> {
    let (fd, family, unlink) = match spec {
        Spec::Tcp(addr) if opts.reuseport => (reuseport_bound(addr)?, Family::Tcp, None),
        Spec::Tcp(addr) => (
            OwnedFd::from(TcpListener::bind(addr).call("bind")?),
            Family::Tcp,
            None,
        ),
        Spec::Unix(path) => {
            let l = bind_unix(&path, opts.unix_mode)?;
            let st = rustix::fs::stat(&path).call("stat")?;
            (
                OwnedFd::from(l),
                Family::Unix,
                Some((path, st.st_dev as u64, st.st_ino as u64)),
            )
        }
        Spec::Udp(addr) if opts.reuseport => (
            reuseport_socket(addr, SocketType::DGRAM)?,
            Family::Udp,
            None,
        ),
        Spec::Udp(addr) => (
            OwnedFd::from(UdpSocket::bind(addr).call("bind")?),
            Family::Udp,
            None,
        ),
        Spec::Bound(fd, family) => {
            check_bound(&fd, family)?;
            (fd, family, None)
        }
    };
    if family == Family::Udp {
        // Bound, and left as it came (blocking, unless the application made it otherwise): the
        // primary never reads it, and the mode is the workers' to choose.
        let addr = local_addr(fd.as_fd(), family)?;
        return Ok(Listener {
            fd: Some(fd),
            family,
            addr,
            unlink,
        });
    }
    listen(&fd, family, opts)?;
    let addr = local_addr(fd.as_fd(), family)?;
    Ok(Listener {
        fd: Some(fd),
        family,
        addr,
        unlink,
    })
}

/// [`reuseport_socket`], and for port 0 bound again to the port the kernel chose: a socket
/// bound to port 0 gives its port back when it stops listening (a `shutdown`), and would
/// listen again on another port; one bound to a port keeps it.
fn reuseport_bound(addr: SocketAddr) -> Result<OwnedFd> {
    let first = reuseport_socket(addr, SocketType::STREAM)?;
    if addr.port() != 0 {
        return Ok(first);
    }
    let ListenAddr::Tcp(chosen) = local_addr(first.as_fd(), Family::Tcp)? else {
        return Err(crate::error::Error::Invalid(
            "a TCP socket with a non-TCP address",
        ));
    };
    reuseport_socket(chosen, SocketType::STREAM)
}

/// A TCP (`STREAM`) or UDP (`DGRAM`) socket bound to `addr` with `SO_REUSEADDR` and
/// `SO_REUSEPORT` (a TCP one not listening yet).
fn reuseport_socket(addr: SocketAddr, ty: SocketType) -> Result<OwnedFd> {
    use rustix::net::{sockopt, AddressFamily};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(family, ty, rustix::net::SocketFlags::CLOEXEC, None)
        .call("socket")?;
    sockopt::set_socket_reuseaddr(&fd, true).call("setsockopt(SO_REUSEADDR)")?;
    sockopt::set_socket_reuseport(&fd, true).call("setsockopt(SO_REUSEPORT)")?;
    rustix::net::bind(&fd, &addr).call("bind")?;
    Ok(fd)
}

/// One more socket in the reuseport group of listener `l` (a TCP listener or UDP socket with
/// `SO_REUSEPORT`): bound to the same address, listening like it (TCP). `None` when `l` cannot
/// have one (a Unix listener, or an inherited socket without `SO_REUSEPORT`: it stays shared).
pub(crate) fn seat_socket(l: &Listener, opts: BindOptions) -> Result<Option<OwnedFd>> {
    let (ty, addr) = match (l.family, &l.addr) {
        (Family::Tcp, ListenAddr::Tcp(a)) => (SocketType::STREAM, a),
        (Family::Udp, ListenAddr::Udp(a)) => (SocketType::DGRAM, a),
        _ => return Ok(None),
    };
    let Some(orig) = &l.fd else { return Ok(None) };
    if !rustix::net::sockopt::socket_reuseport(orig).unwrap_or(false) {
        return Ok(None);
    }
    let fd = reuseport_socket(*addr, ty)?;
    if l.family == Family::Tcp {
        listen(&fd, Family::Tcp, opts)?;
    }
    Ok(Some(fd))
}

/// `listen`, nonblocking, and the options that apply after bind.
fn listen(fd: &OwnedFd, family: Family, opts: BindOptions) -> Result<()> {
    let (backlog, defer_accept) = (opts.backlog, opts.defer_accept);
    rustix::net::listen(fd, backlog).call("listen")?;
    // The listener is nonblocking in every process: the primary accepts until EAGAIN, and in
    // the shared schedule the workers race for each connection. Blocking only when the
    // application accepts on it itself (`Builder::app_accepts`: nothing of the cluster does).
    rustix::io::ioctl_fionbio(fd, opts.nonblocking).call("ioctl(FIONBIO)")?;
    if let (Some(secs), Family::Tcp) = (defer_accept, family) {
        crate::sys::set_tcp_defer_accept(fd.as_fd(), secs)?;
    }
    Ok(())
}

/// A socket the application passed (`listener_fd`, `systemd_listeners`): a stream socket for
/// TCP and Unix (listening already, or not yet: `bind` has it listen), a bound `AF_INET` or
/// `AF_INET6` datagram socket for UDP. Unix datagram sockets are not served.
fn check_bound(fd: &OwnedFd, family: Family) -> Result<()> {
    use rustix::net::{sockopt, AddressFamily};
    let ty = sockopt::socket_type(fd).call("getsockopt(SO_TYPE)")?;
    match family {
        Family::Tcp | Family::Unix if ty == SocketType::STREAM => Ok(()),
        Family::Unix if ty == SocketType::DGRAM => Err(crate::Error::Invalid(
            "listener_fd: a Unix datagram socket; the cluster serves TCP, Unix stream and UDP sockets",
        )),
        Family::Udp
            if ty == SocketType::DGRAM
                && matches!(
                    sockopt::socket_domain(fd),
                    Ok(AddressFamily::INET) | Ok(AddressFamily::INET6)
                ) =>
        {
            Ok(())
        }
        _ => Err(crate::Error::Invalid(
            "listener_fd: not a TCP, Unix stream or UDP socket",
        )),
    }
}

/// Binds a Unix stream socket at `path`. A socket file left there by a crashed run (nobody
/// answers on it: `ECONNREFUSED`) is removed and the bind tried again, as nginx and systemd do;
/// a live one is `EADDRINUSE`, and anything that is not a socket is left alone. With `mode`,
/// the file gets exactly that mode, whatever the umask (set around the bind, so the file never
/// exists with a wider one).
fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener> {
    let attempt = || {
        let old = mode.map(|m| rustix::process::umask(Mode::from_bits_truncate(!m & 0o777)));
        let r = UnixListener::bind(path);
        if let Some(old) = old {
            rustix::process::umask(old);
        }
        r
    };
    let l = match attempt() {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && is_stale_socket(path) => {
            let _ = std::fs::remove_file(path);
            attempt().call("bind")?
        }
        r => r.call("bind")?,
    };
    if let Some(m) = mode {
        rustix::fs::chmod(path, Mode::from_bits_truncate(m)).call("chmod")?;
    }
    Ok(l)
}

/// A socket file on which nobody listens.
fn is_stale_socket(path: &Path) -> bool {
    let is_socket = rustix::fs::stat(path)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Socket);
    is_socket
        && matches!(
            UnixStream::connect(path),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
}

/// Removes a socket file this cluster created, if it is still the one it created.
// `st_dev`/`st_ino` are not u64 on every target.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn unlink(l: &mut Listener) {
    if let Some((p, dev, ino)) = l.unlink.take() {
        if rustix::fs::stat(&p).is_ok_and(|st| st.st_dev as u64 == dev && st.st_ino as u64 == ino) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Removes the socket files these listeners created (those still theirs).
pub(crate) fn unlink_all(listeners: &mut [Listener]) {
    for l in listeners {
        unlink(l);
    }
}

fn local_addr(fd: BorrowedFd<'_>, family: Family) -> Result<ListenAddr> {
    let owned = fd.try_clone_to_owned().call("fcntl(F_DUPFD_CLOEXEC)")?;
    Ok(match family {
        Family::Tcp => ListenAddr::Tcp(TcpListener::from(owned).local_addr().call("getsockname")?),
        Family::Unix => {
            ListenAddr::Unix(UnixListener::from(owned).local_addr().call("getsockname")?)
        }
        Family::Udp => ListenAddr::Udp(UdpSocket::from(owned).local_addr().call("getsockname")?),
    })
}
