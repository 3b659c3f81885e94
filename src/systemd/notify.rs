//! `sd_notify` over `NOTIFY_SOCKET`, the watchdog's cadence, and the order of the messages
//! across a cluster's life ([`Lifecycle`]).

use core::fmt::Write as _;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use arrayvec::ArrayString;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

use super::{my_pid, parse_u64};
use crate::error::{Call, Error, Result};

/// The largest notification [`Notifier::send`] formats (bytes, the stack buffer's size).
pub const MAX_NOTIFICATION: usize = 512;

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
        // rustix looks up the vDSO's clock_gettime on its first use, and where the kernel lacks
        // PR_GET_AUXV (before Linux 6.4, and under qemu-user) it reads /proc/self/auxv into a
        // Vec to do so: once, here, so that no notification allocates.
        let _ = monotonic_usec();
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
