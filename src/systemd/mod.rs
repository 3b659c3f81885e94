//! systemd integration without libsystemd: socket activation and `sd_notify`.
//!
//! Both protocols are small and stable (`sd_listen_fds(3)`, `sd_notify(3)`), so forkcluster
//! speaks them itself, with `rustix` and no other dependency:
//!
//! * **Socket activation** ([`listen_fds`], [`Builder::systemd_listeners`](crate::Builder::systemd_listeners)): systemd (or
//!   `systemd-socket-activate`) binds the sockets of a `.socket` unit and passes them to the
//!   service as fds 3, 4, ... with `LISTEN_PID` (the pid they are meant for), `LISTEN_FDS`
//!   (how many) and `LISTEN_FDNAMES` (their `FileDescriptorName=`s, colon-separated). The
//!   service may then bind nothing itself, start before its port is free, run unprivileged from
//!   the start, and be restarted without refusing a single connection: the sockets stay open
//!   in systemd while the service is down.
//! * **Notifications** ([`Notifier`]): a `Type=notify` service tells systemd over the datagram
//!   socket in `NOTIFY_SOCKET` when it is ready (`READY=1`), reloading (`RELOADING=1`),
//!   stopping (`STOPPING=1`), what it is doing (`STATUS=`), that it is alive (`WATCHDOG=1`, at
//!   least every `WATCHDOG_USEC`), and which pid is the main one (`MAINPID=`).
//!
//! Each message is formatted into a buffer on the stack and sent with one nonblocking
//! `sendto`: no allocation, and a service manager that does not read its socket can never
//! stall the primary (the error comes back and may be ignored).
//!
//! README's "Deployment under systemd" has a unit file pair and what each variable does.

use std::ffi::OsStr;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;

use rustix::net::{AddressFamily, SocketType};

use crate::error::{Call, Error, Result};
use crate::listener::ListenAddr;

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The most fds [`listen_fds`] takes (a larger `LISTEN_FDS` is refused as malformed).
pub const MAX_LISTEN_FDS: usize = 1024;

/// The address family of an activated socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFamily {
    /// IPv4 (`AF_INET`).
    Inet,
    /// IPv6 (`AF_INET6`).
    Inet6,
    /// Unix domain (`AF_UNIX`), path or abstract.
    Unix,
}

/// The type of an activated socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A listening stream socket (`SOCK_STREAM`: TCP, or a Unix stream socket).
    Stream,
    /// A datagram socket (`SOCK_DGRAM`: UDP, or a Unix datagram socket). The cluster serves
    /// UDP ones as [`Builder::listen_udp`](crate::Builder::listen_udp)'s; Unix datagram
    /// sockets are accepted here for applications that serve them themselves.
    Datagram,
}

/// One socket passed by the service manager (see [`listen_fds`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct ActivatedFd {
    /// The socket, close-on-exec.
    pub fd: OwnedFd,
    /// Its name from `LISTEN_FDNAMES` (the socket unit's `FileDescriptorName=`, by default
    /// the unit's name), or `"unknown"` when the variable is not set, as libsystemd says.
    pub name: String,
    /// Its address family.
    pub family: SocketFamily,
    /// Stream (listening) or datagram.
    pub kind: SocketKind,
}

impl ActivatedFd {
    /// The address the socket is bound to (`getsockname`): [`ListenAddr::Udp`] for a UDP
    /// socket.
    ///
    /// # Example
    ///
    /// ```no_run
    /// for s in forkcluster::systemd::listen_fds(true)? {
    ///     println!("{} {} {:?}", s.name, s.local_addr()?, s.kind);
    /// }
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn local_addr(&self) -> Result<ListenAddr> {
        let owned = self.fd.try_clone().call("fcntl(F_DUPFD_CLOEXEC)")?;
        Ok(match self.family {
            SocketFamily::Inet | SocketFamily::Inet6 if self.kind == SocketKind::Datagram => {
                ListenAddr::Udp(UdpSocket::from(owned).local_addr().call("getsockname")?)
            }
            SocketFamily::Inet | SocketFamily::Inet6 => {
                ListenAddr::Tcp(TcpListener::from(owned).local_addr().call("getsockname")?)
            }
            SocketFamily::Unix => {
                ListenAddr::Unix(UnixListener::from(owned).local_addr().call("getsockname")?)
            }
        })
    }
}

impl AsFd for ActivatedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<ActivatedFd> for OwnedFd {
    fn from(a: ActivatedFd) -> OwnedFd {
        a.fd
    }
}

/// The sockets the service manager passed to this process (`sd_listen_fds_with_names(3)`
/// without libsystemd), in order: fd 3 first.
///
/// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. When `LISTEN_PID` is not this
/// process's pid, or `LISTEN_FDS` is not set, nothing was passed to this process: the result is
/// empty (a child that inherited the variables must not take fds meant for its parent). Each
/// fd must be an `AF_INET`, `AF_INET6` or `AF_UNIX` socket that is either a listening
/// `SOCK_STREAM` socket or a `SOCK_DGRAM` socket ([`SocketKind`] says which); anything else
/// fails with [`Error::Activation`], which names the fd and what is wrong with it. On any error
/// after the fds were taken (a bad fd, a `LISTEN_FDNAMES` without one name per fd) every fd
/// passed is closed. Every fd returned is close-on-exec.
///
/// With `unset_env`, the three variables are removed from the environment (whether or not they
/// were valid), so that workers and programs they run do not see them. Removing them is only
/// sound while the process has one thread: call this early in `main`, as
/// [`Builder::start`](crate::Builder::start) must be anyway.
///
/// The fds are taken once per process: later calls return an empty list. Call it before the
/// process opens any file of its own, so that numbers from 3 on are the passed sockets.
///
/// # Example
///
/// Serve the sockets of a `.socket` unit, or bind one when started by hand:
///
/// ```no_run
/// use forkcluster::Cluster;
/// use forkcluster::systemd::{listen_fds, SocketKind};
///
/// let passed = listen_fds(true)?;
/// let mut builder = Cluster::builder();
/// if passed.is_empty() {
///     builder = builder.listen("127.0.0.1:8080".parse().unwrap());
/// }
/// for s in passed {
///     if s.kind == SocketKind::Stream {
///         eprintln!("listener {}: {}", s.name, s.local_addr()?);
///         builder = builder.listener_fd(s.fd);
///     }
/// }
/// # Ok::<(), forkcluster::Error>(())
/// ```
pub fn listen_fds(unset_env: bool) -> Result<Vec<ActivatedFd>> {
    let pid = std::env::var_os("LISTEN_PID");
    let fds = std::env::var_os("LISTEN_FDS");
    let names = std::env::var_os("LISTEN_FDNAMES");
    if unset_env {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    let pid = parse_u64(&pid).ok_or(Error::Invalid("LISTEN_PID is not a pid"))?;
    if pid != my_pid() {
        return Ok(Vec::new());
    }
    let n = parse_u64(&fds).ok_or(Error::Invalid("LISTEN_FDS is not a number"))?;
    if n > MAX_LISTEN_FDS as u64 {
        return Err(Error::Invalid("LISTEN_FDS is larger than MAX_LISTEN_FDS"));
    }
    let n = n as usize;
    let Some(taken) = crate::sys::take_inherited_fds(LISTEN_FDS_START, n) else {
        return Ok(Vec::new());
    };
    // Every fd is owned (and so closed on an error) and close-on-exec before any is judged.
    let mut owned = Vec::with_capacity(n);
    let mut first_error = None;
    for (raw, fd) in taken {
        match fd {
            Some(fd) => {
                if let Err(e) = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC) {
                    first_error.get_or_insert(Error::os("fcntl(F_SETFD)", e));
                }
                owned.push((raw, fd));
            }
            None => {
                first_error.get_or_insert(Error::Activation {
                    fd: raw,
                    why: "is not open",
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let names = split_names(names.as_deref(), n)?;
    let mut out = Vec::with_capacity(n);
    for ((raw, fd), name) in owned.into_iter().zip(names) {
        let (family, kind) = classify(raw, fd.as_fd())?;
        out.push(ActivatedFd {
            fd,
            name,
            family,
            kind,
        });
    }
    Ok(out)
}

/// What kind of socket `fd` is, or why it cannot be served.
fn classify(raw: RawFd, fd: BorrowedFd<'_>) -> Result<(SocketFamily, SocketKind)> {
    let bad = |why| Error::Activation { fd: raw, why };
    let ty = match rustix::net::sockopt::socket_type(fd) {
        Ok(t) => t,
        Err(rustix::io::Errno::NOTSOCK) => return Err(bad("is not a socket")),
        Err(e) => return Err(Error::os("getsockopt(SO_TYPE)", e)),
    };
    let family = match rustix::net::sockopt::socket_domain(fd).call("getsockopt(SO_DOMAIN)")? {
        AddressFamily::INET => SocketFamily::Inet,
        AddressFamily::INET6 => SocketFamily::Inet6,
        AddressFamily::UNIX => SocketFamily::Unix,
        _ => {
            return Err(bad(
                "is a socket of a family other than AF_INET, AF_INET6 and AF_UNIX",
            ))
        }
    };
    let kind = if ty == SocketType::STREAM {
        if !rustix::net::sockopt::socket_acceptconn(fd).call("getsockopt(SO_ACCEPTCONN)")? {
            return Err(bad("is a stream socket that is not listening"));
        }
        SocketKind::Stream
    } else if ty == SocketType::DGRAM {
        SocketKind::Datagram
    } else {
        return Err(bad(
            "is a socket of a type other than SOCK_STREAM and SOCK_DGRAM",
        ));
    };
    Ok((family, kind))
}

/// This process's pid, as the variables spell it.
pub(crate) fn my_pid() -> u64 {
    u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    )
}

/// A decimal number with nothing around it, as `LISTEN_PID`/`LISTEN_FDS`/`WATCHDOG_USEC` are.
pub(crate) fn parse_u64(s: &OsStr) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(b).ok()?.parse().ok()
}

/// `n` names from `LISTEN_FDNAMES`, or `"unknown"` each when it is not set.
fn split_names(names: Option<&OsStr>, n: usize) -> Result<Vec<String>> {
    let Some(names) = names else {
        return Ok(vec![String::from("unknown"); n]);
    };
    let v: Vec<String> = if n == 0 && names.is_empty() {
        Vec::new()
    } else {
        names
            .as_bytes()
            .split(|&b| b == b':')
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    if v.len() != n {
        return Err(Error::Invalid(
            "LISTEN_FDNAMES does not have one name per fd of LISTEN_FDS",
        ));
    }
    Ok(v)
}

mod notify;
pub use notify::{watchdog_interval, Lifecycle, Notifier, MAX_NOTIFICATION};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_plain_decimal() {
        assert_eq!(parse_u64(OsStr::new("42")), Some(42));
        for bad in [
            "",
            " 1",
            "1 ",
            "+1",
            "-1",
            "0x10",
            "1a",
            "999999999999999999999",
        ] {
            assert_eq!(parse_u64(OsStr::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn names_one_per_fd() {
        assert_eq!(split_names(None, 2).unwrap(), ["unknown", "unknown"]);
        assert_eq!(
            split_names(Some(OsStr::new("web:admin")), 2).unwrap(),
            ["web", "admin"]
        );
        assert_eq!(
            split_names(Some(OsStr::new("a::b")), 3).unwrap(),
            ["a", "", "b"]
        );
        assert!(split_names(Some(OsStr::new("")), 0).unwrap().is_empty());
        assert_eq!(split_names(Some(OsStr::new("")), 1).unwrap(), [""]);
        assert!(split_names(Some(OsStr::new("web")), 2).is_err());
        assert!(split_names(Some(OsStr::new("a:b:c")), 2).is_err());
    }

    #[test]
    fn notify_addresses() {
        assert!(Notifier::new("/run/systemd/notify").is_ok());
        assert!(Notifier::new("@abstract").is_ok());
        for bad in ["", "@", "relative", "vsock:2:1234"] {
            assert!(
                matches!(Notifier::new(bad), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(Notifier::new(long).is_err());
    }
}
