//! The builder: settings, listeners, and the fork of the first workers.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::deploy::{self, Affinity, Groups, NameOrId};
use crate::error::{Error, Result};
use crate::listener::{self, Family, Spec};
use crate::primary::Primary;
use crate::settings::{Schedule, Settings, Supervision, MAX_IN_FLIGHT, MAX_LISTENERS};

/// What the worker function returns becomes the worker's exit code.
///
/// `()` is 0, an `i32` is itself, `Ok` is its value's code and `Err(e)` prints `Error: {e:?}` on
/// stderr, as `main` does, and is 1.
pub trait ExitCode {
    /// The exit code.
    fn code(self) -> i32;
}

impl ExitCode for () {
    fn code(self) -> i32 {
        0
    }
}

impl ExitCode for i32 {
    fn code(self) -> i32 {
        self
    }
}

impl<T: ExitCode, E: core::fmt::Debug> ExitCode for core::result::Result<T, E> {
    fn code(self) -> i32 {
        match self {
            Ok(t) => t.code(),
            Err(e) => {
                eprintln!("Error: {e:?}");
                1
            }
        }
    }
}

/// Builds and starts a cluster.
///
/// # Example
///
/// ```no_run
/// use forkcluster::{Cluster, Event, Next};
/// use std::io::Write;
///
/// let mut primary = Cluster::builder()
///     .listen("127.0.0.1:8080".parse()?)
///     .workers(2)
///     .start(|mut worker| -> forkcluster::Result<()> {
///         while let Some(next) = worker.next()? {
///             match next {
///                 Next::Connection(mut conn) => {
///                     let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
///                 }
///                 Next::Message(_) => {}
///                 Next::Disconnect => break,
///             }
///         }
///         Ok(())
///     })?;
/// while let Some(event) = primary.next_event()? {
///     eprintln!("{event}");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Builder {
    specs: Vec<Spec>,
    workers: Option<usize>,
    schedule: Schedule,
    in_flight: usize,
    max_open: Option<u32>,
    max_workers: usize,
    nonblocking: bool,
    app_accepts: bool,
    backlog: i32,
    defer_accept: Option<u32>,
    unix_mode: Option<u32>,
    sd_notify: bool,
    env: Vec<(String, String)>,
    sup: Supervision,
    deploy: deploy::Options,
    exec: Option<PathBuf>,
    exec_args: Vec<OsString>,
    exec_cwd: Option<PathBuf>,
}

/// Entry point: `Cluster::builder()`.
pub struct Cluster;

impl Cluster {
    /// A builder with the defaults: one worker per available CPU, round-robin, no listener.
    pub fn builder() -> Builder {
        Builder {
            specs: Vec::new(),
            workers: None,
            schedule: Schedule::RoundRobin,
            in_flight: 16,
            max_open: None,
            max_workers: 1024,
            nonblocking: false,
            app_accepts: false,
            backlog: 511,
            defer_accept: None,
            unix_mode: None,
            sd_notify: true,
            env: Vec::new(),
            sup: Supervision::default(),
            deploy: deploy::Options::default(),
            exec: None,
            exec_args: Vec::new(),
            exec_cwd: None,
        }
    }
}

impl Builder {
    /// Listens on a TCP address (IPv4 or IPv6; port 0 picks one port that every worker shares).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.specs.push(Spec::Tcp(addr));
        self
    }

    /// Listens on a Unix stream socket at `path`. A socket file left there by a crashed run
    /// (nobody answers on it) is replaced; a live one is `EADDRINUSE`. The file is removed again
    /// when the cluster stops or the primary is dropped, if it is still the one the cluster made.
    /// Its mode is the umask's, or [`unix_mode`](Self::unix_mode).
    pub fn listen_unix(mut self, path: impl AsRef<Path>) -> Self {
        self.specs.push(Spec::Unix(path.as_ref().to_path_buf()));
        self
    }

    /// Uses a TCP listener the application bound itself.
    pub fn tcp_listener(mut self, l: TcpListener) -> Self {
        self.specs.push(Spec::Bound(l.into(), Family::Tcp));
        self
    }

    /// Uses a Unix listener the application bound itself.
    pub fn unix_listener(mut self, l: UnixListener) -> Self {
        self.specs.push(Spec::Bound(l.into(), Family::Unix));
        self
    }

    /// Binds a UDP socket at `addr` (IPv4 or IPv6; port 0 picks one port), shared by every
    /// worker as Node's clustered `dgram` sockets are: the primary binds it and never reads
    /// it, and every worker holds it, in every schedule (datagrams are not handed off: the
    /// kernel gives each one to whichever worker reads first). Workers read it through
    /// [`Worker::udp_socket`](crate::Worker::udp_socket); [`Worker::next`](crate::Worker::next)
    /// never touches it. It takes the next listener index, in one index space with the TCP and
    /// Unix listeners, and each worker announces it ([`Event::Listening`](crate::Event::Listening),
    /// address [`ListenAddr::Udp`](crate::ListenAddr::Udp)).
    ///
    /// The socket is blocking, as [`UdpSocket::bind`] makes it; its mode is one for all the
    /// workers (they share one open socket), see [`Worker::udp_socket`](crate::Worker::udp_socket).
    /// [`backlog`](Self::backlog) and [`defer_accept`](Self::defer_accept) do not apply to it.
    ///
    /// ```no_run
    /// use forkcluster::Cluster;
    ///
    /// let primary = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse()?)      // listener 0: TCP
    ///     .listen_udp("127.0.0.1:5353".parse()?)  // listener 1: UDP
    ///     .start(|worker| -> forkcluster::Result<()> {
    ///         let sock = worker.udp_socket(1).expect("listener 1 is UDP");
    ///         let mut buf = [0u8; 1500];
    ///         loop {
    ///             let (n, from) = sock.recv_from(&mut buf)?;
    ///             let _ = sock.send_to(&buf[..n], from);
    ///         }
    ///     })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn listen_udp(mut self, addr: SocketAddr) -> Self {
        self.specs.push(Spec::Udp(addr));
        self
    }

    /// Uses a UDP socket the application bound itself, as [`listen_udp`](Self::listen_udp)
    /// would bind it (its blocking mode is left as it is).
    ///
    /// ```
    /// let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let b = forkcluster::Cluster::builder().udp_socket(s);
    /// assert_eq!(b.listener_count(), 1);
    /// ```
    pub fn udp_socket(mut self, s: UdpSocket) -> Self {
        self.specs.push(Spec::Bound(s.into(), Family::Udp));
        self
    }

    /// Uses a socket the application made: a TCP or Unix stream socket (bound; listening
    /// already or not yet: the cluster has it listen) or a bound UDP (`AF_INET`/`AF_INET6`
    /// `SOCK_DGRAM`) socket, which is served as [`listen_udp`](Self::listen_udp)'s. The kind
    /// is read from the socket; anything else (a Unix datagram socket, a socket of another
    /// family or type, not a socket) is an [`Error::Invalid`] or [`Error::Os`] from
    /// [`start`](Self::start).
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    ///
    /// let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let b = forkcluster::Cluster::builder().listener_fd(OwnedFd::from(udp));
    /// assert_eq!(b.listener_count(), 1);
    /// ```
    pub fn listener_fd(mut self, fd: OwnedFd) -> Self {
        self.specs.push(Spec::bound(fd));
        self
    }

    /// How many listeners the builder has so far (for example: did
    /// [`systemd_listeners`](Self::systemd_listeners) adopt any?).
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().listen("127.0.0.1:0".parse().unwrap());
    /// assert_eq!(b.listener_count(), 1);
    /// ```
    pub fn listener_count(&self) -> usize {
        self.specs.len()
    }

    /// How many workers to fork (default: one per CPU this process may run on, from
    /// `sched_getaffinity`; this is `std::thread::available_parallelism()` without its cgroup
    /// quota parsing, which costs a static binary several kilobytes).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// How connections reach workers (default [`Schedule::RoundRobin`]).
    pub fn schedule(mut self, s: Schedule) -> Self {
        self.schedule = s;
        self
    }

    /// Round-robin: how many hand-offs may wait in one worker's queue before it gets no more
    /// (1..=[`MAX_IN_FLIGHT`], default 16; Node's is 1). The bound is the send buffer of the
    /// primary's end of the worker's channel, so it is approximate, and the kernel's smallest
    /// buffer holds about 6.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.in_flight = n;
        self
    }

    /// The most connections one worker holds open at once (Node's `server.maxConnections`;
    /// default: no limit). A worker at the limit gets no new connection from the primary, and
    /// one that reaches it anyway (accepted itself, or handed over just as its count rose)
    /// is handed back with [`Worker::refuse`](crate::Worker::refuse) and served by another
    /// worker: where Node drops such a connection, forkcluster loses none. When every worker
    /// is at the limit, connections wait in the primary's queue and then in the kernel's
    /// backlog. A connection counts from its hand-over until its
    /// [`Connection`](crate::Connection) is dropped or its stream taken out.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().max_connections_per_worker(100);
    /// ```
    pub fn max_connections_per_worker(mut self, n: u32) -> Self {
        self.max_open = Some(n);
        self
    }

    /// The size of the worker table (default 1024): workers alive at once, at most.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }

    /// Hand connections to workers in nonblocking mode (`O_NONBLOCK`), for workers with their
    /// own poll loop; saves them an `fcntl` per connection. Default: blocking, as `accept` gives.
    pub fn nonblocking_streams(mut self, yes: bool) -> Self {
        self.nonblocking = yes;
        self
    }

    /// [`Schedule::Shared`]: the application accepts on the listeners itself, through [`Worker::tcp_listener`](crate::Worker::tcp_listener)
    /// and [`Worker::unix_listener`](crate::Worker::unix_listener) (a server library that takes
    /// a `TcpListener`, or its own accept loop), and [`Worker::next`](crate::Worker::next)
    /// never accepts: it returns the primary's messages and the disconnect only. The stream
    /// listeners are then left blocking, so a plain `incoming()` loop works unchanged (the
    /// blocking mode is the socket's, one for the primary and every worker, which is why this
    /// is the cluster's choice and not a worker's). Default off. Workers still announce their
    /// listeners at their first `next`/`try_next`: call `try_next` once before serving.
    ///
    /// A worker blocked in `accept` does not see [`Next::Disconnect`](crate::Next::Disconnect):
    /// read [`Worker::next`](crate::Worker::next) on another thread of the worker (or poll the
    /// listener next to the worker's fd) to finish when asked, or the graceful stop ends it at
    /// [`graceful_timeout`](Self::graceful_timeout). Connections the application accepts are
    /// not the cluster's to count: [`max_requests`](Self::max_requests) cannot be used with it.
    /// With any other schedule it is an [`Error::Invalid`] from [`start`](Self::start): in the
    /// hand-off schedules the primary accepts, and under [`Schedule::ReusePort`] the primary
    /// itself accepts on a seat's socket while no worker holds it, which a blocking socket
    /// would stall.
    ///
    /// ```no_run
    /// use forkcluster::{Cluster, Schedule};
    ///
    /// let b = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse().unwrap())
    ///     .schedule(Schedule::Shared)
    ///     .app_accepts(true);
    /// # drop(b);
    /// ```
    pub fn app_accepts(mut self, yes: bool) -> Self {
        self.app_accepts = yes;
        self
    }

    /// The listen backlog of the listeners the cluster binds (default 511, as Node and nginx).
    pub fn backlog(mut self, n: i32) -> Self {
        self.backlog = n;
        self
    }

    /// TCP listeners accept a connection only once its client has sent data, or after `secs`
    /// seconds (Linux `TCP_DEFER_ACCEPT`, nginx's `deferred`). For protocols where the client
    /// speaks first (HTTP): a worker then gets connections it can serve at once, so fewer are in
    /// its hands when it dies, and connections that never send anything cost no worker.
    /// Not for protocols where the server speaks first (SMTP, SSH).
    pub fn defer_accept(mut self, secs: u32) -> Self {
        self.defer_accept = Some(secs);
        self
    }

    /// The mode of the Unix socket files the cluster creates (for example `0o660`: owner and
    /// group may connect; Node's `readableAll`/`writableAll` are `0o666`), exactly, whatever the
    /// umask.
    ///
    /// ```no_run
    /// let b = forkcluster::Cluster::builder()
    ///     .listen_unix("/run/app.sock")
    ///     .unix_mode(0o660);
    /// ```
    pub fn unix_mode(mut self, mode: u32) -> Self {
        self.unix_mode = Some(mode & 0o7777);
        self
    }

    /// Whether the primary speaks `sd_notify` when it runs under systemd with `Type=notify`
    /// (default on; without `NOTIFY_SOCKET` nothing happens): `READY=1` once every wanted
    /// worker is listening, `STATUS=` with the worker count, `RELOADING=1` during a rolling
    /// restart and `READY=1` after it, `STOPPING=1`, and `WATCHDOG=1` at half of
    /// `WATCHDOG_USEC` from the primary's loop, so that a wedged primary is restarted. The
    /// variables are unset, so workers do not inherit them. See [`crate::systemd`].
    ///
    /// ```no_run
    /// let b = forkcluster::Cluster::builder().sd_notify(false);
    /// ```
    pub fn sd_notify(mut self, yes: bool) -> Self {
        self.sd_notify = yes;
        self
    }

    /// Sets an environment variable in every worker (Node's `cluster.fork(env)`); see also
    /// [`Primary::fork_with_env`].
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Fork a worker again when it exits without being asked to (default on). Off is Node's
    /// manual mode.
    pub fn respawn(mut self, yes: bool) -> Self {
        self.sup.respawn = yes;
        self
    }

    /// A worker exit code that means "do not restart me" (nginx uses 2): reported, not respawned.
    pub fn fatal_exit_code(mut self, code: i32) -> Self {
        self.sup.fatal_exit_code = Some(code);
        self
    }

    /// Crash-loop backoff. A worker that dies before it was ready (listening, or in its loop
    /// when the cluster has no listener) and before `healthy_uptime` (default 1 s) is a start-up
    /// crash: it is respawned after a delay that doubles from `min` (100 ms) up to `max` (10 s),
    /// and a respawned worker that stays up for `healthy_uptime` resets the delay. A worker that
    /// dies young after it was ready (killed while serving) is respawned after `min`: never more
    /// than one fork per `min`, and no growing gap in service.
    pub fn backoff(mut self, min: Duration, max: Duration, healthy_uptime: Duration) -> Self {
        self.sup.backoff_min = min;
        self.sup.backoff_max = max.max(min);
        self.sup.healthy_uptime = healthy_uptime;
        self
    }

    /// Graceful stop: how long workers may take to finish before SIGKILL (default 30 s).
    pub fn graceful_timeout(mut self, d: Duration) -> Self {
        self.sup.graceful_timeout = d;
        self
    }

    /// Fast stop: how long after SIGTERM before SIGKILL (default 1 s). (A worker that breaks
    /// the protocol is killed at once, whatever this says.)
    pub fn fast_timeout(mut self, d: Duration) -> Self {
        self.sup.fast_timeout = d;
        self
    }

    /// Rolling restart: workers replaced at a time (default 1).
    pub fn restart_batch(mut self, n: usize) -> Self {
        self.sup.restart_batch = n.max(1);
        self
    }

    /// A worker whose heartbeat does not move for `d` while it is busy, or while hand-offs
    /// wait in its queue (a stopped or wedged worker whose last beat said idle), gets SIGABRT,
    /// then SIGKILL a second later, and is replaced (default off). Workers beat on every
    /// [`Worker::next`](crate::Worker::next)/[`Worker::try_next`](crate::Worker::try_next) and
    /// [`Worker::heartbeat`](crate::Worker::heartbeat).
    pub fn hang_timeout(mut self, d: Duration) -> Self {
        self.sup.hang_timeout = Some(d);
        self
    }

    /// Recycle a worker after it handled `n` connections, plus a random jitter of up to
    /// `jitter`, so that workers do not restart together. Its replacement is listening before it
    /// is disconnected.
    pub fn max_requests(mut self, n: u64, jitter: u64) -> Self {
        self.sup.max_requests = Some((n.max(1), jitter));
        self
    }

    /// Whether the primary handles the usual signals (default on): TERM and QUIT stop
    /// gracefully, INT stops fast, HUP restarts the workers one by one, TTIN/TTOU add or remove a
    /// worker. Off leaves them to the application; SIGCHLD is always the cluster's.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.sup.signals = yes;
        self
    }

    /// Workers `execve` this program instead of running a worker function (Node's
    /// `setupPrimary({ exec })`); start the cluster with [`start_exec`](Self::start_exec),
    /// where the details are. A relative path is taken from the primary's working directory
    /// when the cluster starts.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().exec("/usr/local/bin/my-worker");
    /// # drop(b);
    /// ```
    pub fn exec(mut self, program: impl Into<PathBuf>) -> Self {
        self.exec = Some(program.into());
        self
    }

    /// The arguments the [`exec`](Self::exec)'d program gets after its `argv[0]` (which is its
    /// path; Node's `args`). Default: none.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder()
    ///     .exec("/usr/local/bin/my-worker")
    ///     .exec_args(["--port-name", "web"]);
    /// # drop(b);
    /// ```
    pub fn exec_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.exec_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// The working directory of the [`exec`](Self::exec)'d program (Node's `cwd`; `chdir` in
    /// the child, after the privilege drop, before `execve`; a failure is an exit with
    /// [`EXIT_EXEC_FAILED`](crate::EXIT_EXEC_FAILED)). Default: the primary's.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder()
    ///     .exec("/usr/local/bin/my-worker")
    ///     .exec_cwd("/srv/app");
    /// # drop(b);
    /// ```
    pub fn exec_cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.exec_cwd = Some(dir.into());
        self
    }

    /// Binds the listeners, forks the workers, and returns the primary.
    ///
    /// Each worker runs `worker` in its own process and exits with its result (see
    /// [`ExitCode`]); this call returns only in the primary. The process must be
    /// single-threaded: start the cluster before spawning threads.
    ///
    /// With [`exec`](Self::exec) set, this is an [`Error::Invalid`]: use
    /// [`start_exec`](Self::start_exec).
    pub fn start<F, R>(self, mut worker: F) -> Result<Primary>
    where
        F: FnMut(crate::Worker) -> R + 'static,
        R: ExitCode,
    {
        if self.exec.is_some() {
            return Err(Error::Invalid(
                "Builder::exec is set: the workers run that program; start with start_exec()",
            ));
        }
        self.start_inner(Box::new(move |w| worker(w).code()), None)
    }

    /// Binds the listeners and forks the workers, each of which `execve`s the program of
    /// [`exec`](Self::exec) (Node's `setupPrimary({ exec })` then `fork()`); returns the
    /// primary. The program calls [`Worker::from_env`](crate::Worker::from_env) and serves
    /// its worker as a forked worker would; it may be another binary than the primary's.
    ///
    /// The path is exec'd again at every fork, so a respawn or a rolling restart
    /// ([`Primary::restart`], SIGHUP) runs the file that is at the path then: a new worker
    /// binary is picked up without restarting the primary.
    ///
    /// Between `fork` and `execve` the child does what every worker does first (die with the
    /// primary, reset signals, name, CPU, the privilege drop of [`user`](Self::user)), then
    /// places its channel at fd [`EXEC_CHANNEL_FD`](crate::EXEC_CHANNEL_FD) (3) and the
    /// sockets it holds at 4, 5, ... (the UDP sockets always, the stream listeners where
    /// workers accept), closes every other fd above stderr, changes
    /// to [`exec_cwd`](Self::exec_cwd) and execs, with the primary's environment, the
    /// variables of [`env`](Self::env) and the `FORKCLUSTER_*` variables
    /// [`Worker::from_env`](crate::Worker::from_env) reads. Nothing is allocated in the child:
    /// the primary builds the arguments and environment before each fork. If the exec fails
    /// (no such file, not executable, ...) the child writes one line on stderr and exits with
    /// [`EXIT_EXEC_FAILED`](crate::EXIT_EXEC_FAILED) (127): a start-up crash, respawned with
    /// backoff.
    ///
    /// Exec'd workers share no memory with the primary, so there is no heartbeat to watch:
    /// [`hang_timeout`](Self::hang_timeout) is an [`Error::Invalid`] here, and so is
    /// [`max_requests`](Self::max_requests) in the shared schedule (the workers' own accept
    /// counts are not seen); in round-robin the primary counts the hand-offs itself.
    ///
    /// Without [`exec`](Self::exec), this is an [`Error::Invalid`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// use forkcluster::Cluster;
    ///
    /// let mut primary = Cluster::builder()
    ///     .listen("127.0.0.1:8080".parse()?)
    ///     .workers(2)
    ///     .exec("/usr/local/bin/my-worker")
    ///     .exec_args(["--verbose"])
    ///     .exec_cwd("/srv/app")
    ///     .start_exec()?;
    /// while let Some(event) = primary.next_event()? {
    ///     eprintln!("{event}");
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn start_exec(mut self) -> Result<Primary> {
        let Some(path) = self.exec.take() else {
            return Err(Error::Invalid(
                "start_exec needs the program to exec: Builder::exec(path)",
            ));
        };
        if self.sup.hang_timeout.is_some() {
            return Err(Error::Invalid(
                "hang_timeout needs the shared heartbeat page, which exec'd workers do not have",
            ));
        }
        if self.sup.max_requests.is_some() && self.schedule.workers_accept() {
            return Err(Error::Invalid(
                "max_requests in the shared schedule needs the workers' shared counters, which exec'd workers do not have",
            ));
        }
        let spec = crate::settings::ExecSpec::new(
            path,
            core::mem::take(&mut self.exec_args),
            self.exec_cwd.take(),
            crate::exec::plan,
        )?;
        // Never runs: the children exec instead.
        self.start_inner(Box::new(|_| 1), Some(spec))
    }

    fn start_inner(
        self,
        worker_fn: crate::worker::WorkerFn,
        exec: Option<crate::settings::ExecSpec>,
    ) -> Result<Primary> {
        if crate::sys::thread_count() > 1 {
            return Err(Error::Invalid(
                "start the cluster before spawning threads: fork needs a single-threaded process",
            ));
        }
        let n = match self.workers {
            Some(n) => n,
            None => crate::sys::cpu_count(),
        };
        if self.max_workers == 0 || self.max_workers > crate::primary::MAX_WORKERS {
            return Err(Error::Invalid("max_workers must be between 1 and 65536"));
        }
        if n == 0 || n > self.max_workers {
            return Err(Error::Invalid(
                "worker count must be between 1 and max_workers",
            ));
        }
        if self.in_flight == 0 || self.in_flight > MAX_IN_FLIGHT {
            return Err(Error::Invalid(
                "max_in_flight must be between 1 and MAX_IN_FLIGHT",
            ));
        }
        if self.specs.len() > MAX_LISTENERS {
            return Err(Error::Capacity("listeners"));
        }
        if self.app_accepts && self.schedule != Schedule::Shared {
            return Err(Error::Invalid(
                "app_accepts needs Schedule::Shared (the primary accepts in the others)",
            ));
        }
        if self.app_accepts && self.sup.max_requests.is_some() {
            return Err(Error::Invalid(
                "max_requests counts the connections Worker::next accepts: with app_accepts the application accepts them",
            ));
        }
        // Every lookup (NSS), the allowed CPUs and RLIMIT_NOFILE: here, once, before any fork.
        let deploy = self.deploy.resolve()?;
        let mut listeners = Vec::with_capacity(self.specs.len());
        let opts = listener::BindOptions {
            backlog: self.backlog,
            defer_accept: self.defer_accept,
            unix_mode: self.unix_mode,
            reuseport: self.schedule == Schedule::ReusePort,
            nonblocking: !self.app_accepts,
        };
        for spec in self.specs {
            match listener::bind(spec, opts) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    // The socket files this start created go with it.
                    listener::unlink_all(&mut listeners);
                    return Err(e);
                }
            }
        }
        if self.max_open == Some(0) {
            return Err(Error::Invalid(
                "max_connections_per_worker must be at least 1",
            ));
        }
        let settings = Settings {
            max_open: self.max_open,
            backlog: self.backlog,
            bind: opts,
            schedule: self.schedule,
            in_flight: self.in_flight,
            max_workers: self.max_workers,
            nonblocking: self.nonblocking,
            app_accepts: self.app_accepts,
            env: self.env,
            sup: self.sup,
            deploy,
            exec,
        };
        let sd = if self.sd_notify {
            match crate::systemd::Notifier::from_env(true) {
                Ok(n) => n.map(crate::systemd::Lifecycle::new),
                Err(e) => {
                    listener::unlink_all(&mut listeners);
                    return Err(e);
                }
            }
        } else {
            None
        };
        Primary::start(settings, listeners, n, worker_fn, sd)
    }
}

/// Deployment: privilege separation, CPU placement, process names, limits.
impl Builder {
    /// Runs the workers as `user` (a name, or a uid: `user("nobody")`, `user(65534)`), with
    /// that user's group and, by default, its supplementary groups
    /// ([`supplementary_groups`](Builder::supplementary_groups)). The primary keeps its
    /// privileges: it binds the listeners first and needs them again to respawn and restart.
    ///
    /// Each worker drops to the user right after fork, before any application code:
    /// `setgroups`, then `setresgid`, then `setresuid`, and then checks that it held (real,
    /// effective and saved uid and gid are the user's, the groups are the ones set, and
    /// `setuid(0)` fails). A worker whose drop fails or does not verify exits with
    /// [`EXIT_PRIVSEP_FAILED`](crate::EXIT_PRIVSEP_FAILED) without running the worker function:
    /// never a worker that runs as root. Its core dumps and `/proc/PID/mem` are off too
    /// ([`dumpable`](Builder::dumpable)).
    ///
    /// Names are looked up once, in [`start`](Builder::start), before the first fork (no NSS
    /// call happens in a worker). An unknown name is an [`Error::Invalid`]; so is a primary
    /// that is not root asking for a user other than its own (asking for its own changes
    /// nothing).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use forkcluster::Cluster;
    ///
    /// // As root: bind port 80, serve it as `nobody`.
    /// let primary = Cluster::builder()
    ///     .listen("0.0.0.0:80".parse()?)
    ///     .user("nobody")
    ///     .no_new_privs(true)
    ///     .start(|worker| {
    ///         // serve worker.next() ... as nobody
    ///         # drop(worker);
    ///     })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn user(mut self, user: impl Into<NameOrId>) -> Self {
        self.deploy.user = Some(user.into());
        self.deploy.ids_fn = Some(deploy::Options::resolve_ids);
        self
    }

    /// The workers' group (a name or a gid), instead of the [`user`](Builder::user)'s own
    /// group. Without a user, the workers keep the primary's uid and change only their group
    /// (and, as for a user, their supplementary groups: that group alone).
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().user("nobody").group("nogroup");
    /// # drop(b);
    /// ```
    pub fn group(mut self, group: impl Into<NameOrId>) -> Self {
        self.deploy.group = Some(group.into());
        self.deploy.ids_fn = Some(deploy::Options::resolve_ids);
        self
    }

    /// The supplementary groups of workers that change user: the user's groups from the group
    /// database ([`Groups::User`], the default, as `login` sets them) or none
    /// ([`Groups::None`]: only the worker's group). Either way the primary's own groups (root's)
    /// are gone.
    ///
    /// ```
    /// use forkcluster::{Cluster, Groups};
    ///
    /// let b = Cluster::builder().user("nobody").supplementary_groups(Groups::None);
    /// # drop(b);
    /// ```
    pub fn supplementary_groups(mut self, groups: Groups) -> Self {
        self.deploy.groups = groups;
        self
    }

    /// Whether workers are dumpable (`PR_SET_DUMPABLE`): core dumps, and whether processes of
    /// the same user may `ptrace` them or open their `/proc/PID/mem`. Default: off in workers
    /// that change user (the kernel's own rule when credentials change, made explicit), and
    /// left as inherited otherwise. `false` turns it off in every worker; `true` keeps core
    /// dumps of workers that changed user, at the price of letting each such worker read and
    /// write its siblings' memory (they share a uid).
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().user("nobody").dumpable(false);
    /// # drop(b);
    /// ```
    pub fn dumpable(mut self, yes: bool) -> Self {
        self.deploy.dumpable = Some(yes);
        self
    }

    /// Sets `PR_SET_NO_NEW_PRIVS` in each worker (default off): nothing a worker `exec`s can
    /// gain privileges (set-user-ID binaries and file capabilities no longer apply), and it may
    /// install seccomp filters without `CAP_SYS_ADMIN`.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().no_new_privs(true);
    /// # drop(b);
    /// ```
    pub fn no_new_privs(mut self, yes: bool) -> Self {
        self.deploy.no_new_privs = yes;
        self
    }

    /// Pins each worker to one CPU (`sched_setaffinity`, in the worker right after fork):
    /// worker slot `i` on CPU `i` modulo the CPUs of the [`Affinity`]. [`Affinity::Auto`] uses
    /// the CPUs this process may run on when the cluster starts, like nginx's
    /// `worker_cpu_affinity auto`. A list naming a CPU this process may not run on is an
    /// [`Error::Invalid`] from [`start`](Builder::start). Default: no pinning.
    ///
    /// ```
    /// use forkcluster::{Affinity, Cluster};
    ///
    /// let b = Cluster::builder().cpu_affinity(Affinity::Auto);
    /// let c = Cluster::builder().cpu_affinity(Affinity::List(vec![1, 0]));
    /// # drop((b, c));
    /// ```
    pub fn cpu_affinity(mut self, affinity: Affinity) -> Self {
        self.deploy.affinity = Some(affinity);
        self
    }

    /// Raises the soft `RLIMIT_NOFILE` (open files) to `n` when the cluster starts, capped at
    /// the hard limit; it is never lowered. The primary sets it before the first fork, so every
    /// worker has it too; [`Primary::nofile_limit`] says what was set.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().nofile_limit(65536);
    /// # drop(b);
    /// ```
    pub fn nofile_limit(mut self, n: u64) -> Self {
        self.deploy.nofile = Some(n);
        self
    }

    /// The workers' process name (`PR_SET_NAME`, what `ps`, `top` and `/proc/PID/comm` show):
    /// `{prefix}-{id}`, by default [`DEFAULT_WORKER_NAME`](crate::DEFAULT_WORKER_NAME)
    /// (`fc-worker-3`). Linux keeps 15 bytes: a long prefix is cut so the id stays whole. An
    /// empty prefix leaves the workers with the program's name.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().worker_name("web");   // web-1, web-2, ...
    /// # drop(b);
    /// ```
    pub fn worker_name(mut self, prefix: impl Into<String>) -> Self {
        self.deploy.worker_name = Some(prefix.into());
        self
    }

    /// Names the primary process too (`PR_SET_NAME`, at most 15 bytes), for instance
    /// `"fc-primary"`, when the cluster starts. Default: the program's name is kept.
    ///
    /// ```
    /// let b = forkcluster::Cluster::builder().primary_name("fc-primary");
    /// # drop(b);
    /// ```
    pub fn primary_name(mut self, name: impl Into<String>) -> Self {
        self.deploy.primary_name = Some(name.into());
        self
    }
}

impl Builder {
    /// Serves the sockets systemd passed to this process (socket activation): every socket
    /// of [`listen_fds`](crate::systemd::listen_fds), in order, becomes a listener of the cluster, after any added before
    /// (so with nothing else added, systemd's first socket is listener 0), as
    /// [`listener_fd`](Builder::listener_fd) would add it. The variables are unset, so workers
    /// and programs they run do not inherit them.
    ///
    /// When this process was not socket-activated, nothing is added, and the cluster listens
    /// on what else the builder was given. Passed UDP sockets (`ListenDatagram=` on an IP
    /// address) are served as [`listen_udp`](Builder::listen_udp)'s: every worker holds them.
    /// A passed socket the cluster cannot serve (a Unix datagram socket) is an
    /// [`Error::Activation`]; an application that wants those, or the sockets' names
    /// (`LISTEN_FDNAMES`), calls [`listen_fds`](crate::systemd::listen_fds) itself and hands
    /// the others to `listener_fd`.
    ///
    /// As for any listener, [`backlog`](Builder::backlog) and
    /// [`defer_accept`](Builder::defer_accept) apply to the adopted stream sockets too.
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
        let passed = crate::systemd::listen_fds(true)?;
        use crate::systemd::{SocketFamily, SocketKind};
        if let Some(bad) = passed
            .iter()
            .find(|s| s.kind == SocketKind::Datagram && s.family == SocketFamily::Unix)
        {
            return Err(Error::Activation {
                fd: std::os::fd::AsRawFd::as_raw_fd(&bad.fd),
                why: "is a Unix datagram socket: the cluster serves stream sockets and UDP only",
            });
        }
        Ok(passed.into_iter().fold(self, |b, s| b.listener_fd(s.fd)))
    }
}
