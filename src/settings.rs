//! What the builder decided: the schedule, the supervisor's settings, and the limits, handed to
//! the primary and (the parts a worker needs) to each worker.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Call, Error, Result};

/// The most listeners one cluster may have.
pub const MAX_LISTENERS: usize = 16;
/// The largest [`Builder::max_in_flight`](crate::Builder::max_in_flight).
pub const MAX_IN_FLIGHT: usize = 256;

/// How connections reach the workers.
///
/// Two families: in the **hand-off** schedules ([`RoundRobin`](Self::RoundRobin),
/// [`LeastConnections`](Self::LeastConnections), [`Sticky`](Self::Sticky)) the primary accepts
/// every connection and passes its fd to the worker the schedule picks; in the **accepting**
/// schedules ([`Shared`](Self::Shared), [`ReusePort`](Self::ReusePort)) the workers accept
/// themselves and the primary only supervises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Schedule {
    /// The primary accepts each connection and passes its fd to the next ready worker
    /// (Node's `SCHED_RR`, the default). About [`Builder::max_in_flight`](crate::Builder::max_in_flight) hand-offs wait in one
    /// worker's queue at most, so a stuck worker stops getting work; a connection whose worker
    /// dies before taking it goes to another worker.
    #[default]
    RoundRobin,
    /// Every worker accepts on the listener it inherited (Node's `SCHED_NONE`); the kernel
    /// picks which worker (one wakeup per connection: `EPOLLEXCLUSIVE`).
    Shared,
    /// One `SO_REUSEPORT` socket per worker seat for each TCP listener, made and kept by the
    /// primary; each worker accepts on its own seat's socket, and the kernel spreads
    /// connections over the seats by a hash of the addresses. A seat outlives its worker: a
    /// respawned, recycled or restarted worker gets the same socket, so what waits in its
    /// backlog is served, not reset. Unix listeners have no `SO_REUSEPORT`: they are shared
    /// as in [`Shared`](Self::Shared).
    ReusePort,
    /// Hand-off to the worker with fewer open connections of two (power of two choices: the
    /// next in round-robin order and one at random), read from the workers' shared counters
    /// with no system call.
    LeastConnections,
    /// Hand-off by the client's IP address: the same address goes to the same worker seat
    /// (rendezvous hashing over seats), so a worker's death moves only its own clients, and
    /// its replacement gets them back. Unix connections (no address) go by least connections.
    Sticky,
}

impl Schedule {
    /// The primary accepts and hands each connection to a worker (round-robin, least
    /// connections, sticky).
    pub const fn hands_off(self) -> bool {
        matches!(
            self,
            Schedule::RoundRobin | Schedule::LeastConnections | Schedule::Sticky
        )
    }

    /// The workers accept on sockets they hold (shared, reuseport).
    pub const fn workers_accept(self) -> bool {
        !self.hands_off()
    }

    /// The schedule's short name: `rr`, `shared`, `reuseport`, `lc`, `sticky`.
    pub const fn name(self) -> &'static str {
        match self {
            Schedule::RoundRobin => "rr",
            Schedule::Shared => "shared",
            Schedule::ReusePort => "reuseport",
            Schedule::LeastConnections => "lc",
            Schedule::Sticky => "sticky",
        }
    }

    /// The schedule named `name` (see [`name`](Self::name)).
    ///
    /// ```
    /// use forkcluster::Schedule;
    /// assert_eq!(Schedule::from_name("lc"), Some(Schedule::LeastConnections));
    /// assert_eq!(Schedule::from_name("x"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Schedule> {
        [
            Schedule::RoundRobin,
            Schedule::Shared,
            Schedule::ReusePort,
            Schedule::LeastConnections,
            Schedule::Sticky,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// Settings of the supervisor (see [`Builder`](crate::Builder) for each).
#[derive(Debug, Clone)]
pub(crate) struct Supervision {
    pub(crate) respawn: bool,
    pub(crate) fatal_exit_code: Option<i32>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) healthy_uptime: Duration,
    pub(crate) graceful_timeout: Duration,
    pub(crate) fast_timeout: Duration,
    pub(crate) restart_batch: usize,
    pub(crate) hang_timeout: Option<Duration>,
    pub(crate) max_requests: Option<(u64, u64)>,
    pub(crate) signals: bool,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            respawn: true,
            fatal_exit_code: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            healthy_uptime: Duration::from_secs(1),
            graceful_timeout: Duration::from_secs(30),
            fast_timeout: Duration::from_secs(1),
            restart_batch: 1,
            hang_timeout: None,
            max_requests: None,
            signals: true,
        }
    }
}

/// Everything the builder decided, handed to the primary.
pub(crate) struct Settings {
    pub(crate) backlog: i32,
    /// How listeners were bound (reuseport seats bind theirs the same way).
    pub(crate) bind: crate::listener::BindOptions,
    pub(crate) schedule: Schedule,
    pub(crate) in_flight: usize,
    /// `Builder::max_connections_per_worker`.
    pub(crate) max_open: Option<u32>,
    pub(crate) max_workers: usize,
    pub(crate) nonblocking: bool,
    /// `Builder::app_accepts`: the workers' `next` never accepts.
    pub(crate) app_accepts: bool,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) sup: Supervision,
    /// The workers' user, CPUs, names and limits, resolved before the first fork.
    pub(crate) deploy: crate::deploy::Deploy,
    /// `Some`: each worker execs this program instead of running the worker function.
    pub(crate) exec: Option<ExecSpec>,
}

/// What [`Builder::exec`](crate::Builder::exec) asked for, checked in `start_exec`.
#[derive(Debug, Clone)]
pub(crate) struct ExecSpec {
    pub(crate) path: CString,
    pub(crate) args: Vec<CString>,
    pub(crate) cwd: Option<CString>,
    /// Builds one spawn's exec (`exec::plan`). Set by `start_exec` only, so that a program
    /// that never execs its workers does not link the exec code (as `deploy::Options::ids_fn`).
    pub(crate) plan: PlanFn,
}

/// What one exec'd spawn needs from the primary, besides its [`ExecSpec`].
pub(crate) struct PlanInput<'a> {
    pub(crate) id: u32,
    pub(crate) max_open: Option<u32>,
    pub(crate) seat: u32,
    /// Reuseport: the seat's socket for each listener that has one (instead of the shared one).
    pub(crate) seat_fds: &'a [Option<std::os::fd::RawFd>],
    pub(crate) schedule: Schedule,
    pub(crate) nonblocking: bool,
    pub(crate) app_accepts: bool,
    /// The worker's end of its channel.
    pub(crate) chan: std::os::fd::RawFd,
    pub(crate) listeners: &'a [crate::listener::Listener],
    /// `fork_with_env`'s variables.
    pub(crate) env: &'a [(&'a str, &'a str)],
    /// `Builder::env`'s variables.
    pub(crate) cluster_env: &'a [(String, String)],
}

/// One spawn's exec, made in the primary before `fork`; in the child, [`exec`](Self::exec)
/// only reads it.
pub(crate) trait ExecPlan {
    /// In the forked child, right after `fork`: the setup every worker gets first (die with
    /// the primary, signals, name, CPU, privilege drop), then the exec; never returns.
    fn exec(&self, spec: &ExecSpec, child: &ChildSetup<'_>) -> !;
}

/// What the child of an exec'd spawn applies before `execve`.
pub(crate) struct ChildSetup<'a> {
    pub(crate) id: u32,
    pub(crate) slot: usize,
    /// The primary's pid (the child exits at once when its parent is another).
    pub(crate) primary: rustix::process::Pid,
    /// The signals the process ignored when the cluster started (they stay ignored).
    pub(crate) ignored: &'a [i32],
    pub(crate) deploy: &'a crate::deploy::Deploy,
}

/// See [`ExecSpec::plan`].
pub(crate) type PlanFn = fn(&ExecSpec, &PlanInput<'_>) -> Box<dyn ExecPlan>;

fn c_bytes(b: &[u8], why: &'static str) -> Result<CString> {
    CString::new(b).map_err(|_| Error::Invalid(why))
}

impl ExecSpec {
    /// The program (made absolute against the primary's working directory now, so that a
    /// later `exec_cwd` does not change which file it is), its arguments and working directory.
    pub(crate) fn new(
        path: PathBuf,
        args: Vec<OsString>,
        cwd: Option<PathBuf>,
        plan: PlanFn,
    ) -> Result<ExecSpec> {
        if path.as_os_str().is_empty() {
            return Err(Error::Invalid("exec: the program path is empty"));
        }
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir().call("getcwd")?.join(path)
        };
        Ok(ExecSpec {
            path: c_bytes(
                path.as_os_str().as_bytes(),
                "exec: the program path contains a NUL byte",
            )?,
            args: args
                .iter()
                .map(|a| c_bytes(a.as_bytes(), "exec_args: an argument contains a NUL byte"))
                .collect::<Result<_>>()?,
            cwd: cwd
                .map(|c| {
                    c_bytes(
                        c.as_os_str().as_bytes(),
                        "exec_cwd: the path contains a NUL byte",
                    )
                })
                .transpose()?,
            plan,
        })
    }
}
