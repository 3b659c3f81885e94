//! systemd integration without libsystemd: socket activation and `sd_notify`.
//!
//! Both protocols are small and stable (`sd_listen_fds(3)`, `sd_notify(3)`), so forkcluster
//! speaks them itself, with `rustix` and no other dependency:
//!
//! * **Socket activation** ([`listen_fds`], [`Builder::systemd_listeners`]): systemd (or
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
//! See `docs/systemd.md` for a unit file pair and what each variable does.

use core::fmt::Write as _;
use std::ffi::OsStr;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use arrayvec::ArrayString;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

use crate::cluster::{Builder, ListenAddr};
use crate::error::{Call, Error, Result};

/// The first fd of socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The most fds [`listen_fds`] takes (a larger `LISTEN_FDS` is refused as malformed).
pub const MAX_LISTEN_FDS: usize = 1024;

/// The largest notification [`Notifier::send`] formats (bytes, the stack buffer's size).
pub const MAX_NOTIFICATION: usize = 512;

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
    /// stream sockets only; these are accepted for applications that serve them themselves.
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
    /// The address the socket is bound to (`getsockname`).
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
fn my_pid() -> u64 {
    u64::from(
        rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs(),
    )
}

/// A decimal number with nothing around it, as `LISTEN_PID`/`LISTEN_FDS`/`WATCHDOG_USEC` are.
fn parse_u64(s: &OsStr) -> Option<u64> {
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

impl Builder {
    /// Serves the sockets systemd passed to this process (socket activation): every socket
    /// of [`listen_fds`], in order, becomes a listener of the cluster, after any added before
    /// (so with nothing else added, systemd's first socket is listener 0), as
    /// [`listener_fd`](Builder::listener_fd) would add it. The variables are unset, so workers
    /// and programs they run do not inherit them.
    ///
    /// When this process was not socket-activated, nothing is added, and the cluster listens
    /// on what else the builder was given. A passed socket the cluster cannot serve (not a
    /// listening stream socket, such as a datagram socket) is an [`Error::Activation`]; an
    /// application that wants its datagram sockets, or the sockets' names (`LISTEN_FDNAMES`),
    /// calls [`listen_fds`] itself and hands the stream sockets to `listener_fd`.
    ///
    /// As for any listener, [`backlog`](Builder::backlog) and
    /// [`defer_accept`](Builder::defer_accept) apply to the adopted sockets too.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use forkcluster::Cluster;
    ///
    /// let primary = Cluster::builder()
    ///     .systemd_listeners()?
    ///     .workers(4)
    ///     .start(|worker| {
    ///         // serve worker.next() ...
    ///         # drop(worker);
    ///     })?;
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn systemd_listeners(self) -> Result<Self> {
        let passed = listen_fds(true)?;
        if let Some(bad) = passed.iter().find(|s| s.kind != SocketKind::Stream) {
            return Err(Error::Activation {
                fd: std::os::fd::AsRawFd::as_raw_fd(&bad.fd),
                why: "is a datagram socket: the cluster serves listening stream sockets only",
            });
        }
        Ok(passed.into_iter().fold(self, |b, s| b.listener_fd(s.fd)))
    }
}

// ---------------------------------------------------------------------------------------------
// sd_notify

/// Notifications to the service manager over `NOTIFY_SOCKET` (`sd_notify(3)` without
/// libsystemd), and the watchdog's cadence.
///
/// Made once, at start: it reads the variables, opens one `SOCK_DGRAM` Unix socket
/// (close-on-exec) and keeps the address, a path (`/run/systemd/notify`) or an abstract name
/// (`@...`). Each notification is then one nonblocking `sendto` of a message formatted on the
/// stack: no allocation, and never a wait. A failed send (systemd's queue full, no one
/// listening) returns the error, which the caller may ignore.
///
/// # Example
///
/// ```no_run
/// use forkcluster::systemd::Notifier;
///
/// if let Some(mut sd) = Notifier::from_env(true)? {
///     let _ = sd.status(4, 4);
///     let _ = sd.ready();
///     // in the main loop, with next_event_until(sd.next_watchdog() ...):
///     let _ = sd.watchdog_if_due(std::time::Instant::now());
///     // on the way out:
///     let _ = sd.stopping();
/// }
/// # Ok::<(), forkcluster::Error>(())
/// ```
#[derive(Debug)]
pub struct Notifier {
    fd: OwnedFd,
    addr: SocketAddrUnix,
    watchdog: Option<Duration>,
    next_watchdog: Option<Instant>,
}

impl Notifier {
    /// The notifier of this service: `None` when `NOTIFY_SOCKET` is not set (not run by
    /// systemd as `Type=notify`, or `NotifyAccess=none`).
    ///
    /// Also reads the watchdog's interval ([`watchdog_interval`]). With `unset_env`,
    /// `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` are removed from the environment,
    /// so that workers and programs they run do not inherit them (only sound while the
    /// process has one thread). A `NOTIFY_SOCKET` that is neither an absolute path nor an
    /// abstract name (`@...`), such as systemd's `vsock:` addresses, is
    /// [`Error::Invalid`].
    pub fn from_env(unset_env: bool) -> Result<Option<Notifier>> {
        let addr = std::env::var_os("NOTIFY_SOCKET");
        if unset_env {
            std::env::remove_var("NOTIFY_SOCKET");
        }
        let watchdog = watchdog_interval(unset_env);
        let Some(addr) = addr else {
            return Ok(None);
        };
        let mut n = Notifier::new(&addr)?;
        n.set_watchdog_interval(watchdog?);
        Ok(Some(n))
    }

    /// A notifier that sends to `addr`: an absolute path of a Unix datagram socket, or an
    /// abstract name written with a leading `@` (as in `NOTIFY_SOCKET`). No watchdog.
    ///
    /// # Example
    ///
    /// ```
    /// use forkcluster::systemd::Notifier;
    ///
    /// let n = Notifier::new("@forkcluster-doc-example")?;
    /// assert!(n.watchdog_interval().is_none());
    /// assert!(Notifier::new("relative/path").is_err());
    /// # Ok::<(), forkcluster::Error>(())
    /// ```
    pub fn new(addr: impl AsRef<OsStr>) -> Result<Notifier> {
        let b = addr.as_ref().as_bytes();
        let addr = match b.first() {
            Some(b'/') => SocketAddrUnix::new(b).call("NOTIFY_SOCKET")?,
            Some(b'@') if b.len() > 1 => {
                SocketAddrUnix::new_abstract_name(&b[1..]).call("NOTIFY_SOCKET")?
            }
            _ => {
                return Err(Error::Invalid(
                    "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
                ))
            }
        };
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .call("socket")?;
        Ok(Notifier {
            fd,
            addr,
            watchdog: None,
            next_watchdog: None,
        })
    }

    /// Sends one notification as it is: newline-separated `KEY=VALUE` assignments
    /// (`sd_notify(3)` lists them), such as `"EXTEND_TIMEOUT_USEC=5000000"`.
    pub fn send(&self, state: &str) -> Result<()> {
        self.send_bytes(state.as_bytes())
    }

    fn send_bytes(&self, msg: &[u8]) -> Result<()> {
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        loop {
            match rustix::net::sendto(&self.fd, msg, flags, &self.addr) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::os("sendto(NOTIFY_SOCKET)", e)),
            }
        }
    }

    /// Formats a message on the stack and sends it.
    fn send_fmt(&self, args: core::fmt::Arguments<'_>) -> Result<()> {
        let mut buf = ArrayString::<MAX_NOTIFICATION>::new();
        buf.write_fmt(args)
            .map_err(|_| Error::Capacity("notification larger than MAX_NOTIFICATION"))?;
        self.send_bytes(buf.as_bytes())
    }

    /// `READY=1`: start-up (or a reload) finished; for the cluster, every worker listens.
    pub fn ready(&self) -> Result<()> {
        self.send_bytes(b"READY=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` now (`CLOCK_MONOTONIC`, µs), which systemd (253
    /// and later) requires with it: a reload (the rolling restart) began. Send
    /// [`ready`](Self::ready) when it is done.
    pub fn reloading(&self) -> Result<()> {
        self.send_fmt(format_args!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            monotonic_usec()
        ))
    }

    /// `STOPPING=1`: the service is shutting down.
    pub fn stopping(&self) -> Result<()> {
        self.send_bytes(b"STOPPING=1")
    }

    /// `STATUS=<workers>/<wanted> workers`: a line for `systemctl status`.
    pub fn status(&self, workers: usize, wanted: usize) -> Result<()> {
        self.send_fmt(format_args!("STATUS={workers}/{wanted} workers"))
    }

    /// `STATUS=<text>`, cut at the first newline (which would start another assignment).
    pub fn status_text(&self, text: &str) -> Result<()> {
        let line = text.split('\n').next().unwrap_or("");
        self.send_fmt(format_args!("STATUS={line}"))
    }

    /// `WATCHDOG=1`: the service is alive. See [`watchdog_if_due`](Self::watchdog_if_due).
    pub fn watchdog(&self) -> Result<()> {
        self.send_bytes(b"WATCHDOG=1")
    }

    /// `MAINPID=<pid>`: the service's main process is now `pid` (a binary upgrade handing
    /// over to a new primary).
    pub fn mainpid(&self, pid: u32) -> Result<()> {
        self.send_fmt(format_args!("MAINPID={pid}"))
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// advises; `None` when the watchdog is off.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sets the watchdog's cadence (`None`: off); the first `WATCHDOG=1` is due one interval
    /// from now.
    pub fn set_watchdog_interval(&mut self, every: Option<Duration>) {
        self.watchdog = every.filter(|d| !d.is_zero());
        self.next_watchdog = self.watchdog.map(|d| Instant::now() + d);
    }

    /// When the next `WATCHDOG=1` is due: a deadline for the main loop's wait
    /// ([`Primary::next_event_until`](crate::Primary::next_event_until)); `None` when the
    /// watchdog is off.
    pub fn next_watchdog(&self) -> Option<Instant> {
        self.next_watchdog
    }

    /// Sends `WATCHDOG=1` when it is due at `now`, and schedules the next one interval later.
    /// Returns whether it sent. A failed send is retried at the next due time.
    pub fn watchdog_if_due(&mut self, now: Instant) -> Result<bool> {
        match (self.watchdog, self.next_watchdog) {
            (Some(every), Some(at)) if at <= now => {
                self.next_watchdog = Some(now + every);
                self.watchdog().map(|()| true)
            }
            _ => Ok(false),
        }
    }
}

impl AsFd for Notifier {
    /// The notifier's own socket (for closing it in a child, or polling it for errors).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a supervisor tells systemd and when: the state machine over a [`Notifier`] that
/// turns the cluster's lifecycle into notifications, in the order systemd expects.
///
/// | call | sends |
/// |---|---|
/// | [`workers`](Self::workers)`(listening, wanted)` | `STATUS=<listening>/<wanted> workers` when it changed; then `READY=1` once `listening >= wanted` at start, and again at the end of a reload |
/// | [`reloading`](Self::reloading) | `RELOADING=1` + `MONOTONIC_USEC=` (once per reload) |
/// | [`reloaded`](Self::reloaded) | nothing itself: the next `workers` call with all listening sends `READY=1` |
/// | [`stopping`](Self::stopping) | `STOPPING=1` (once); after it only `WATCHDOG=1` |
/// | [`tick`](Self::tick)`(now)` | `WATCHDOG=1` when due (half of `WATCHDOG_USEC`) |
///
/// Sending never blocks; a failed send is counted ([`send_errors`](Self::send_errors)) and
/// otherwise ignored: the service must go on whatever its manager does. Nothing allocates.
///
/// # Example
///
/// An application's own loop over [`Primary::next_event_until`](crate::Primary::next_event_until):
///
/// ```no_run
/// use forkcluster::systemd::{Lifecycle, Notifier};
/// use forkcluster::{Cluster, Event, State};
///
/// let mut sd = Notifier::from_env(true)?.map(Lifecycle::new);
/// let mut primary = Cluster::builder().systemd_listeners()?.start(|_worker| ())?;
/// loop {
///     let next = match sd.as_ref().and_then(Lifecycle::deadline) {
///         Some(at) => primary.next_event_until(at)?,
///         None => primary.next_event()?,
///     };
///     let Some(event) = next else { break };
///     let (restart, done, stop) = (
///         matches!(event, Event::Restart { .. }),
///         matches!(event, Event::RestartDone),
///         matches!(event, Event::Stopping { .. }),
///     );
///     drop(event);
///     if let Some(sd) = sd.as_mut() {
///         sd.tick(std::time::Instant::now());
///         if restart { sd.reloading() }
///         if done { sd.reloaded() }
///         if stop { sd.stopping() }
///         let listening = primary
///             .workers()
///             .filter(|w| w.state == State::Listening && !w.exited_after_disconnect)
///             .count();
///         sd.workers(listening, primary.wanted_workers());
///     }
/// }
/// # Ok::<(), forkcluster::Error>(())
/// ```
#[derive(Debug)]
pub struct Lifecycle {
    notifier: Notifier,
    ready: bool,
    reloading: bool,
    stopping: bool,
    last_status: Option<(usize, usize)>,
    errors: u64,
}

impl Lifecycle {
    /// Starts in "starting": nothing sent yet.
    pub fn new(notifier: Notifier) -> Lifecycle {
        Lifecycle {
            notifier,
            ready: false,
            reloading: false,
            stopping: false,
            last_status: None,
            errors: 0,
        }
    }

    /// The notifier, for messages of the application's own.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    fn count(&mut self, r: Result<()>) {
        if r.is_err() {
            self.errors += 1;
        }
    }

    /// The workers that take connections (`listening`, those not asked to leave) and the
    /// number wanted: `STATUS=` when either changed, and `READY=1` when all listen and the
    /// service was starting or reloading. Call it after every change (or every event: it sends
    /// only on a change).
    pub fn workers(&mut self, listening: usize, wanted: usize) {
        if self.stopping {
            return;
        }
        if self.last_status != Some((listening, wanted)) {
            self.last_status = Some((listening, wanted));
            let r = self.notifier.status(listening, wanted);
            self.count(r);
        }
        if !self.ready && !self.reloading && listening >= wanted {
            self.ready = true;
            let r = self.notifier.ready();
            self.count(r);
        }
    }

    /// A reload (rolling restart) began: `RELOADING=1`, once until [`reloaded`](Self::reloaded).
    pub fn reloading(&mut self) {
        if self.stopping || self.reloading {
            return;
        }
        self.reloading = true;
        let r = self.notifier.reloading();
        self.count(r);
    }

    /// The reload finished: `READY=1` follows from the next [`workers`](Self::workers) call
    /// that finds every wanted worker listening.
    pub fn reloaded(&mut self) {
        if self.reloading {
            self.reloading = false;
            self.ready = false;
        }
    }

    /// The service is stopping: `STOPPING=1`, once; no `STATUS=` or `READY=1` after it.
    pub fn stopping(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let r = self.notifier.stopping();
        self.count(r);
    }

    /// Whether `READY=1` was sent and no reload or stop is under way.
    pub fn is_ready(&self) -> bool {
        self.ready && !self.reloading && !self.stopping
    }

    /// When [`tick`](Self::tick) must run next (the watchdog), for the loop's wait.
    pub fn deadline(&self) -> Option<Instant> {
        self.notifier.next_watchdog()
    }

    /// `WATCHDOG=1` when it is due at `now` ([`Notifier::watchdog_if_due`]). Call it from the
    /// loop, so that a wedged loop stops the pings and systemd restarts the service.
    pub fn tick(&mut self, now: Instant) {
        let r = self.notifier.watchdog_if_due(now).map(|_| ());
        self.count(r);
    }

    /// Notifications that could not be sent (systemd's queue full, no one listening).
    pub fn send_errors(&self) -> u64 {
        self.errors
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `now(CLOCK_MONOTONIC)`.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec.max(0) as u64) * 1_000_000 + (t.tv_nsec.max(0) as u64) / 1_000
}

/// The watchdog's cadence for this process (`sd_watchdog_enabled(3)` without libsystemd):
/// half of `WATCHDOG_USEC`, or `None` when the variable is not set, or `WATCHDOG_PID` is set to
/// another process's pid. A `WATCHDOG_USEC` (or `WATCHDOG_PID`) that is not a positive number
/// is [`Error::Invalid`]. With `unset_env` both variables are removed (only sound while the
/// process has one thread). [`Notifier::from_env`] calls this.
///
/// # Example
///
/// ```
/// // Not run by systemd with WatchdogSec=:
/// std::env::remove_var("WATCHDOG_USEC");
/// assert_eq!(forkcluster::systemd::watchdog_interval(false)?, None);
/// # Ok::<(), forkcluster::Error>(())
/// ```
pub fn watchdog_interval(unset_env: bool) -> Result<Option<Duration>> {
    let usec = std::env::var_os("WATCHDOG_USEC");
    let pid = std::env::var_os("WATCHDOG_PID");
    if unset_env {
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid = parse_u64(&pid)
            .filter(|&p| p > 0)
            .ok_or(Error::Invalid("WATCHDOG_PID is not a pid"))?;
        if pid != my_pid() {
            return Ok(None);
        }
    }
    let usec = parse_u64(&usec)
        .filter(|&u| u > 0)
        .ok_or(Error::Invalid("WATCHDOG_USEC is not a positive number"))?;
    Ok(Some(
        Duration::from_micros(usec / 2).max(Duration::from_micros(1)),
    ))
}

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
