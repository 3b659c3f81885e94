//! Exec'd workers (Node's `setupPrimary({ exec, args, cwd })`): instead of running the worker
//! function, each forked child `execve`s a program, which calls [`Worker::from_env`] and then
//! uses its [`Worker`] as a forked worker does, over the same channel and frames.
//!
//! The primary builds everything before `fork` ([`plan`]: the argument and environment
//! strings and their pointer arrays, the fd list, the failure message); the child makes only
//! async-signal-safe system calls between `fork` and `execve` (the setup every worker gets, the
//! privilege drop, then [`sys::exec_worker`]: [`Plan`]'s `ExecPlan::exec`).
//!
//! # What the exec'd program inherits
//!
//! | what | where |
//! |---|---|
//! | its channel to the primary (`SOCK_SEQPACKET`) | fd [`EXEC_CHANNEL_FD`] (3) |
//! | the UDP sockets (every schedule) and, where workers accept (shared, reuseport), the stream listeners, in the builder's order | fds 4, 5, ... |
//! | stdin, stdout, stderr | fds 0, 1, 2, as the primary's |
//! | anything else | nothing: every other fd is closed |
//!
//! | variable | value |
//! |---|---|
//! | `FORKCLUSTER_WORKER` | the worker's id (`1`, `2`, ...) |
//! | `FORKCLUSTER_CHANNEL_FD` | `3` |
//! | `FORKCLUSTER_SCHEDULE` | the schedule's [`name`](Schedule::name): `rr`, `shared`, ... |
//! | `FORKCLUSTER_NONBLOCKING` | `1` when connections come nonblocking ([`Builder::nonblocking_streams`](crate::Builder::nonblocking_streams)), else `0` |
//! | `FORKCLUSTER_APP_ACCEPTS` | `1` with [`Builder::app_accepts`](crate::Builder::app_accepts), else `0` (unset: `0`) |
//! | `FORKCLUSTER_LISTENERS` | one entry per listener, comma-separated: its family (`tcp`, `unix`, `udp`), and when the worker holds the socket its fd: `tcp:4,unix:5,udp:6` where workers accept; round-robin: `tcp,unix,udp:4` (UDP sockets are always passed); empty without listeners |
//! | `FORKCLUSTER_LISTEN_ADDR_<i>` | listener `i`'s address: `127.0.0.1:8080`, `[::1]:80` (TCP and UDP alike), or a Unix socket's path |
//!
//! plus the primary's environment and the variables of [`Builder::env`](crate::Builder::env)
//! and [`Primary::fork_with_env`](crate::Primary::fork_with_env).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::rc::Rc;

use arrayvec::ArrayVec;

use crate::error::{Call, Error, Result};
use crate::heartbeat::Board;
use crate::listener::{Family, ListenAddr};
use crate::settings::{ChildSetup, ExecPlan, ExecSpec, PlanInput, Schedule, MAX_LISTENERS};
use crate::sys;
use crate::worker::{Worker, WorkerInit};

/// The exit code of an exec'd worker whose `execve` failed (no such program, not executable,
/// a bad [`exec_cwd`](crate::Builder::exec_cwd), ...), as a shell's 127: the child writes one
/// line on stderr and exits with it, and the primary sees an [`Event::Exit`](crate::Event::Exit)
/// with this code, a start-up crash, respawned with backoff.
///
/// ```
/// assert_eq!(forkcluster::EXIT_EXEC_FAILED, 127);
/// ```
pub const EXIT_EXEC_FAILED: i32 = sys::EXEC_FAILED;

/// The fd number of an exec'd worker's channel to the primary; in the shared schedule its
/// listeners follow, at 4, 5, ...
///
/// ```
/// assert_eq!(forkcluster::EXEC_CHANNEL_FD, 3);
/// ```
pub const EXEC_CHANNEL_FD: RawFd = sys::EXEC_FIRST_FD;

const VAR_WORKER: &str = "FORKCLUSTER_WORKER";
const VAR_CHANNEL: &str = "FORKCLUSTER_CHANNEL_FD";
const VAR_SCHEDULE: &str = "FORKCLUSTER_SCHEDULE";
const VAR_SEAT: &str = "FORKCLUSTER_SEAT";
const VAR_MAX_OPEN: &str = "FORKCLUSTER_MAX_CONNECTIONS";
const VAR_NONBLOCKING: &str = "FORKCLUSTER_NONBLOCKING";
const VAR_APP_ACCEPTS: &str = "FORKCLUSTER_APP_ACCEPTS";
const VAR_LISTENERS: &str = "FORKCLUSTER_LISTENERS";
const VAR_ADDR: &str = "FORKCLUSTER_LISTEN_ADDR_";
/// Every variable of the protocol starts with this (the primary's own are not passed on).
const PREFIX: &[u8] = b"FORKCLUSTER_";

/// One spawn's `execve`, made in the primary before `fork`: the child only reads it.
pub(crate) struct Plan {
    // The pointer arrays point into these strings' heap buffers, which do not move.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    fds: ArrayVec<RawFd, { MAX_LISTENERS + 1 }>,
    failed: Vec<u8>,
}

fn kv(k: &[u8], v: &[u8]) -> Option<CString> {
    let mut b = Vec::with_capacity(k.len() + v.len() + 1);
    b.extend_from_slice(k);
    b.push(b'=');
    b.extend_from_slice(v);
    CString::new(b).ok()
}

impl Plan {
    /// Everything worker `id` execs with: `argv` (the path, then the arguments), the
    /// environment (the primary's now, without `FORKCLUSTER_*`, then `extra` in order, a later
    /// key replacing an earlier one, then the protocol's variables), and the fds to place (the
    /// channel `chan`, then, shared schedule, the listeners).
    pub(crate) fn new(spec: &ExecSpec, input: &PlanInput<'_>) -> Plan {
        let PlanInput {
            id,
            max_open,
            seat,
            seat_fds,
            schedule,
            nonblocking,
            app_accepts,
            chan,
            listeners,
            env: extra,
            cluster_env: extra2,
        } = *input;
        let shared = schedule.workers_accept();
        let mut fds = ArrayVec::new();
        fds.push(chan);
        let mut list = Vec::new();
        let mut addrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (i, l) in listeners.iter().take(MAX_LISTENERS).enumerate() {
            if !list.is_empty() {
                list.push(b',');
            }
            list.extend_from_slice(match l.family {
                Family::Tcp => b"tcp",
                Family::Unix => b"unix",
                Family::Udp => b"udp",
            });
            // Reuseport: the seat's own socket for this listener, where it has one.
            let fd = seat_fds
                .get(i)
                .copied()
                .flatten()
                .or(l.fd.as_ref().map(|f| f.as_raw_fd()));
            // UDP sockets go to every worker, whatever the schedule (as in `spawn`; under
            // reuseport the seat's own, from `seat_fds`).
            let holds = shared || l.family == Family::Udp;
            if let (true, Some(fd)) = (holds, fd) {
                list.extend_from_slice(
                    format!(":{}", EXEC_CHANNEL_FD + fds.len() as RawFd).as_bytes(),
                );
                fds.push(fd);
            }
            let addr = match &l.addr {
                ListenAddr::Tcp(a) | ListenAddr::Udp(a) => a.to_string().into_bytes(),
                ListenAddr::Unix(a) => a
                    .as_pathname()
                    .map(|p| p.as_os_str().as_bytes().to_vec())
                    .unwrap_or_default(),
            };
            addrs.push((format!("{VAR_ADDR}{i}").into_bytes(), addr));
        }
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .filter(|(k, _)| !k.starts_with(PREFIX))
            .collect();
        let extras = extra2
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.iter().copied());
        for (k, v) in extras {
            env.retain(|(ek, _)| ek.as_slice() != k.as_bytes());
            env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        let proto = [
            (VAR_WORKER, id.to_string()),
            (VAR_CHANNEL, EXEC_CHANNEL_FD.to_string()),
            (VAR_SCHEDULE, schedule.name().to_string()),
            (VAR_SEAT, seat.to_string()),
            (
                VAR_MAX_OPEN,
                max_open.map_or(String::new(), |n| n.to_string()),
            ),
            (
                VAR_NONBLOCKING,
                if nonblocking { "1" } else { "0" }.to_string(),
            ),
            (
                VAR_APP_ACCEPTS,
                if app_accepts { "1" } else { "0" }.to_string(),
            ),
        ];
        env.retain(|(k, _)| !k.starts_with(PREFIX));
        for (k, v) in proto {
            env.push((k.as_bytes().to_vec(), v.into_bytes()));
        }
        env.push((VAR_LISTENERS.as_bytes().to_vec(), list));
        env.extend(addrs);
        let mut strings: Vec<CString> = Vec::new();
        let mut argv = Vec::new();
        let mut envp = Vec::new();
        for a in core::iter::once(&spec.path).chain(spec.args.iter()) {
            strings.push(a.clone());
        }
        let nargs = strings.len();
        // An environment entry with a NUL byte cannot be passed on (Rust's own `Command` refuses
        // it too): it is left out.
        strings.extend(env.iter().filter_map(|(k, v)| kv(k, v)));
        for (i, s) in strings.iter().enumerate() {
            if i < nargs {
                argv.push(s.as_ptr());
            } else {
                envp.push(s.as_ptr());
            }
        }
        argv.push(core::ptr::null());
        envp.push(core::ptr::null());
        let mut failed =
            format!("forkcluster: worker {id}: exec {}", Lossy(&spec.path)).into_bytes();
        if let Some(c) = &spec.cwd {
            failed.extend_from_slice(format!(" in {}", Lossy(c)).as_bytes());
        }
        Plan {
            _strings: strings,
            argv,
            envp,
            fds,
            failed,
        }
    }
}

/// The [`PlanFn`](crate::settings::PlanFn) that `start_exec` puts in the [`ExecSpec`].
pub(crate) fn plan(spec: &ExecSpec, input: &PlanInput<'_>) -> Box<dyn ExecPlan> {
    Box::new(Plan::new(spec, input))
}

impl ExecPlan for Plan {
    /// In the forked child: dies with the primary, resets signals, takes its name and CPU and
    /// drops privileges (as `primary::spawn` does for a forked worker), then places the fds,
    /// changes directory and execs; never returns (a failure exits with
    /// [`EXIT_EXEC_FAILED`]). Only async-signal-safe calls, no allocation and no drop: the
    /// primary's fds are close-on-exec, and the exec replaces the rest. (Here rather than in
    /// `spawn`, so that it is reached only through [`plan`]: not linked without `exec`.)
    fn exec(&self, spec: &ExecSpec, child: &ChildSetup<'_>) -> ! {
        use rustix::process::Signal;
        let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
        if rustix::process::getppid() != Some(child.primary) {
            sys::exit_now(1);
        }
        sys::reset_child_signals(child.ignored);
        child.deploy.enter(child.id, child.slot, child.primary);
        sys::exec_worker(
            &self.fds,
            spec.cwd.as_deref(),
            &spec.path,
            &self.argv,
            &self.envp,
            &self.failed,
        )
    }
}

struct Lossy<'a>(&'a CStr);

impl core::fmt::Display for Lossy<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.0.to_bytes()))
    }
}

/// The protocol's variables of this process, parsed.
struct FromEnv {
    id: u32,
    max_open: Option<u32>,
    seat: u32,
    chan: RawFd,
    schedule: Schedule,
    nonblocking: bool,
    app_accepts: bool,
    listeners: Vec<(Family, Option<RawFd>, ListenAddr)>,
}

fn var(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

fn number(v: &OsStr, why: &'static str) -> Result<u32> {
    v.to_str()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(Error::Invalid(why))
}

fn parse_env() -> Result<FromEnv> {
    let id = var(VAR_WORKER).ok_or(Error::Invalid(
        "FORKCLUSTER_WORKER is not set: this program was not exec'd by a forkcluster primary (Builder::exec)",
    ))?;
    let id = number(&id, "FORKCLUSTER_WORKER is not a worker id")?;
    if id == 0 {
        return Err(Error::Invalid("FORKCLUSTER_WORKER is not a worker id"));
    }
    let chan = var(VAR_CHANNEL).ok_or(Error::Invalid("FORKCLUSTER_CHANNEL_FD is not set"))?;
    let chan = number(&chan, "FORKCLUSTER_CHANNEL_FD is not an fd number")?;
    let chan = RawFd::try_from(chan)
        .map_err(|_| Error::Invalid("FORKCLUSTER_CHANNEL_FD is not an fd number"))?;
    let schedule = match var(VAR_SCHEDULE)
        .as_deref()
        .and_then(OsStr::to_str)
        .and_then(Schedule::from_name)
    {
        Some(s) => s,
        None => {
            return Err(Error::Invalid(
                "FORKCLUSTER_SCHEDULE is not the name of a schedule",
            ))
        }
    };
    let nonblocking = match var(VAR_NONBLOCKING).as_deref().and_then(OsStr::to_str) {
        Some("0") => false,
        Some("1") => true,
        _ => {
            return Err(Error::Invalid(
                "FORKCLUSTER_NONBLOCKING is not set to 0 or 1",
            ))
        }
    };
    let app_accepts = match var(VAR_APP_ACCEPTS).as_deref().map(OsStr::to_str) {
        None | Some(Some("0")) => false,
        Some(Some("1")) => true,
        _ => {
            return Err(Error::Invalid(
                "FORKCLUSTER_APP_ACCEPTS is not set to 0 or 1",
            ))
        }
    };
    let list = var(VAR_LISTENERS).ok_or(Error::Invalid("FORKCLUSTER_LISTENERS is not set"))?;
    let list = list
        .to_str()
        .ok_or(Error::Invalid("FORKCLUSTER_LISTENERS is not ASCII"))?;
    let mut listeners = Vec::new();
    for (i, entry) in list.split(',').filter(|e| !e.is_empty()).enumerate() {
        if i >= MAX_LISTENERS {
            return Err(Error::Invalid(
                "FORKCLUSTER_LISTENERS names more than MAX_LISTENERS listeners",
            ));
        }
        let (family, fd) = match entry.split_once(':') {
            Some((f, n)) => (
                f,
                Some(number(
                    OsStr::new(n),
                    "FORKCLUSTER_LISTENERS: a bad fd number",
                )?),
            ),
            None => (entry, None),
        };
        let family = match family {
            "tcp" => Family::Tcp,
            "unix" => Family::Unix,
            "udp" => Family::Udp,
            _ => {
                return Err(Error::Invalid(
                    "FORKCLUSTER_LISTENERS: a family other than tcp, unix or udp",
                ))
            }
        };
        if fd.is_some() && !schedule.workers_accept() && family.accepts() {
            return Err(Error::Invalid(
                "FORKCLUSTER_LISTENERS: stream listener fds are passed only where workers accept",
            ));
        }
        if fd.is_none() && family == Family::Udp {
            return Err(Error::Invalid(
                "FORKCLUSTER_LISTENERS: a udp entry without its fd",
            ));
        }
        let fd = fd
            .map(|n| {
                RawFd::try_from(n)
                    .map_err(|_| Error::Invalid("FORKCLUSTER_LISTENERS: a bad fd number"))
            })
            .transpose()?;
        let raw = var(&format!("{VAR_ADDR}{i}")).ok_or(Error::Invalid(
            "FORKCLUSTER_LISTEN_ADDR_<i> is not set for a listener",
        ))?;
        let addr = match family {
            Family::Tcp => ListenAddr::Tcp(raw.to_str().and_then(|s| s.parse().ok()).ok_or(
                Error::Invalid("FORKCLUSTER_LISTEN_ADDR_<i> is not a TCP address"),
            )?),
            Family::Udp => ListenAddr::Udp(raw.to_str().and_then(|s| s.parse().ok()).ok_or(
                Error::Invalid("FORKCLUSTER_LISTEN_ADDR_<i> is not a UDP address"),
            )?),
            Family::Unix if raw.is_empty() => ListenAddr::Unix(
                std::os::unix::net::UnixDatagram::unbound()
                    .and_then(|s| s.local_addr())
                    .call("socket")?,
            ),
            Family::Unix => {
                ListenAddr::Unix(std::os::unix::net::SocketAddr::from_pathname(&raw).map_err(
                    |_| Error::Invalid("FORKCLUSTER_LISTEN_ADDR_<i> is not a Unix socket path"),
                )?)
            }
        };
        listeners.push((family, fd, addr));
    }
    let seat = match var(VAR_SEAT) {
        Some(v) => number(&v, "FORKCLUSTER_SEAT is not a seat number")?,
        None => 0,
    };
    let max_open = match var(VAR_MAX_OPEN) {
        Some(v) if !v.is_empty() => {
            Some(number(&v, "FORKCLUSTER_MAX_CONNECTIONS is not a number")?)
        }
        _ => None,
    };
    Ok(FromEnv {
        max_open,
        id,
        seat,
        chan,
        schedule,
        nonblocking,
        app_accepts,
        listeners,
    })
}

/// Unsets every `FORKCLUSTER_*` variable of this process, so that programs it runs do not
/// inherit them.
fn unset_all() {
    let keys: Vec<OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.as_bytes().starts_with(PREFIX))
        .collect();
    for k in keys {
        std::env::remove_var(k);
    }
}

fn check_channel(fd: &OwnedFd) -> Result<()> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let not = Error::Invalid("FORKCLUSTER_CHANNEL_FD is not a SOCK_SEQPACKET Unix socket");
    match sockopt::socket_type(fd) {
        Ok(SocketType::SEQPACKET) => {}
        _ => return Err(not),
    }
    match rustix::net::getsockname(fd).map(|a| a.address_family()) {
        Ok(AddressFamily::UNIX) => Ok(()),
        _ => Err(not),
    }
}

fn check_listener(fd: &OwnedFd, family: Family) -> Result<()> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    if family == Family::Udp {
        let af = sockopt::socket_domain(fd);
        return if sockopt::socket_type(fd) == Ok(SocketType::DGRAM)
            && (af == Ok(AddressFamily::INET) || af == Ok(AddressFamily::INET6))
        {
            Ok(())
        } else {
            Err(Error::Invalid(
                "FORKCLUSTER_LISTENERS: a udp fd is not an AF_INET or AF_INET6 datagram socket",
            ))
        };
    }
    let not = Error::Invalid(
        "FORKCLUSTER_LISTENERS: an fd is not a listening stream socket of its family",
    );
    if sockopt::socket_type(fd) != Ok(SocketType::STREAM)
        || sockopt::socket_acceptconn(fd) != Ok(true)
    {
        return Err(not);
    }
    let af = rustix::net::getsockname(fd)
        .map(|a| a.address_family())
        .map_err(|_| not)?;
    let ok = match family {
        Family::Tcp => af == AddressFamily::INET || af == AddressFamily::INET6,
        Family::Unix => af == AddressFamily::UNIX,
        Family::Udp => false,
    };
    if ok {
        Ok(())
    } else {
        Err(not)
    }
}

impl Worker {
    /// The worker handle of a program that a forkcluster primary exec'd
    /// ([`Builder::exec`](crate::Builder::exec)): reads and checks the `FORKCLUSTER_*`
    /// variables (see the table below), takes the channel at fd
    /// [`EXEC_CHANNEL_FD`](crate::EXEC_CHANNEL_FD) (and after it the UDP sockets and, where
    /// workers accept, the stream listeners), checks that each is the socket it must be, sets their close-on-exec flag
    /// again, unsets the variables, and tells the primary this worker is online. From then on
    /// the worker is used exactly as a forked one: [`next`](Self::next),
    /// [`send`](Self::send), ...
    ///
    /// Fails with [`Error::Invalid`] when the process was not exec'd by a primary (no
    /// `FORKCLUSTER_WORKER`), a variable is malformed, a named fd is not open or not the
    /// expected socket, or when called a second time in the process.
    ///
    /// Exec'd workers have no shared counters: the primary cannot see their heartbeat (so
    /// [`Builder::hang_timeout`](crate::Builder::hang_timeout) cannot be used with
    /// [`Builder::exec`](crate::Builder::exec)), and their [`WorkerInfo`](crate::WorkerInfo)
    /// message and shared-schedule connection counts stay 0 (and `since_heartbeat` counts from
    /// the fork). [`heartbeat`](Self::heartbeat)
    /// still works (it writes a page of the worker's own).
    ///
    /// | variable | value |
    /// |---|---|
    /// | `FORKCLUSTER_WORKER` | the worker's id |
    /// | `FORKCLUSTER_CHANNEL_FD` | `3` |
    /// | `FORKCLUSTER_SCHEDULE` | `rr`, `shared`, ... ([`Schedule::name`]) |
    /// | `FORKCLUSTER_NONBLOCKING` | `0` or `1` |
    /// | `FORKCLUSTER_APP_ACCEPTS` | `0` or `1` (unset: `0`) |
    /// | `FORKCLUSTER_LISTENERS` | `tcp:4,unix:5,udp:6` (shared), `tcp,unix,udp:4` (round-robin: only UDP sockets are passed), or empty |
    /// | `FORKCLUSTER_LISTEN_ADDR_<i>` | listener `i`'s address |
    ///
    /// # Example
    ///
    /// The worker program (`examples/exec_worker.rs` is a complete one):
    ///
    /// ```no_run
    /// use forkcluster::{Next, Worker};
    /// use std::io::Write;
    ///
    /// fn main() -> forkcluster::Result<()> {
    ///     let mut worker = Worker::from_env()?;
    ///     while let Some(next) = worker.next()? {
    ///         match next {
    ///             Next::Connection(mut conn) => {
    ///                 let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
    ///             }
    ///             Next::Message(m) => eprintln!("message: {:?}", m.payload),
    ///             Next::Disconnect => break,
    ///         }
    ///     }
    ///     Ok(())
    /// }
    /// ```
    ///
    /// Outside a cluster it fails:
    ///
    /// ```
    /// # std::env::remove_var("FORKCLUSTER_WORKER");
    /// let e = forkcluster::Worker::from_env().unwrap_err();
    /// assert!(matches!(e, forkcluster::Error::Invalid(_)));
    /// ```
    pub fn from_env() -> Result<Worker> {
        let parsed = parse_env();
        unset_all();
        let env = parsed?;
        let mut raws: ArrayVec<RawFd, { MAX_LISTENERS + 1 }> = ArrayVec::new();
        raws.push(env.chan);
        for (_, fd, _) in &env.listeners {
            if let Some(fd) = fd {
                raws.push(*fd);
            }
        }
        let mut fds = sys::take_exec_fds(&raws)?.into_iter();
        let chan = fds
            .next()
            .ok_or(Error::Invalid("FORKCLUSTER_CHANNEL_FD is not open"))?;
        check_channel(&chan)?;
        let mut listeners = Vec::with_capacity(env.listeners.len());
        for (family, fd, addr) in env.listeners {
            let fd = match fd {
                Some(_) => {
                    let fd = fds.next().ok_or(Error::Invalid(
                        "an fd named in FORKCLUSTER_LISTENERS is not open",
                    ))?;
                    check_listener(&fd, family)?;
                    Some(fd)
                }
                None => None,
            };
            listeners.push((fd, family, addr));
        }
        Worker::new(WorkerInit {
            id: env.id,
            chan: crate::channel::Channel::from_fd(chan),
            listeners,
            schedule: env.schedule,
            nonblocking: env.nonblocking,
            max_open: env.max_open,
            app_accepts: env.app_accepts,
            // Counters of its own, that nobody reads: the primary's pages do not survive exec.
            board: Rc::new(Board::new(1)?),
            slot: 0,
            seat: env.seat,
        })
    }
}
