//! What the primary reports: [`Event`], one line each through `Display`; the queue of events
//! waiting for the application; and the [`ClusterStats`] counters they feed.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use arrayvec::ArrayVec;

use crate::error::Error;
use crate::frame::MAX_FDS;
use crate::listener::{ListenAddr, Listener};

/// Counters of the whole cluster since the primary started (see [`Primary::stats`](crate::Primary::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Workers forked.
    pub forks: u64,
    /// Workers that exited.
    pub exits: u64,
    /// Exits that were not asked for (crashes, outside kills): respawned when respawn is on.
    pub crashes: u64,
    /// Respawns delayed by the crash-loop backoff.
    pub backoffs: u64,
    /// Workers killed for not making progress.
    pub hung: u64,
    /// Workers recycled after `max_requests`.
    pub recycled: u64,
    /// Workers replaced by rolling restarts.
    pub restarted: u64,
    /// Workers that broke the protocol.
    pub protocol_errors: u64,
    /// Connections handed to workers (round-robin).
    pub connections: u64,
    /// Connections read back from the queue of a worker that died before receiving them, and
    /// handed to another worker (round-robin).
    pub recovered: u64,
    /// Times accepting paused after an error such as `EMFILE`.
    pub accept_pauses: u64,
    /// Forks that failed (reported as [`Event::SpawnFailed`] and retried after a backoff).
    pub spawn_failures: u64,
    /// Control signals (TERM, INT, QUIT, HUP, TTIN, TTOU) sent by one of the cluster's own
    /// workers, and ignored.
    pub ignored_signals: u64,
    /// Children that were not workers, reaped because the primary is PID 1 or a child
    /// subreaper (orphaned grandchildren).
    pub orphans_reaped: u64,
    /// Shared and reuseport schedules: times a TCP listener that a worker had shut down
    /// listened again.
    pub listeners_restored: u64,
    /// Connections a worker handed back ([`Worker::refuse`](crate::Worker::refuse), or
    /// [`max_connections_per_worker`](crate::Builder::max_connections_per_worker)), given to
    /// another worker.
    pub refused: u64,
}

/// Something that happened in the cluster. One line each through `Display`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A worker process was forked.
    Fork {
        /// Worker id.
        id: u32,
        /// Its pid.
        pid: u32,
    },
    /// A worker is running.
    Online {
        /// Worker id.
        id: u32,
    },
    /// A worker takes connections for a listener.
    Listening {
        /// Worker id.
        id: u32,
        /// The listener's index.
        listener: usize,
        /// The listener's address (with the real port when the builder asked for port 0).
        addr: &'a ListenAddr,
    },
    /// A worker sent a message.
    Message {
        /// Worker id.
        id: u32,
        /// The bytes (borrowing the primary's receive buffer until the next call).
        payload: &'a [u8],
        /// The fds that came with it.
        fds: ArrayVec<OwnedFd, MAX_FDS>,
    },
    /// A worker's channel closed (Node's `'disconnect'`): the worker disconnected itself
    /// ([`Worker::disconnect`](crate::Worker::disconnect)), took the primary's request to
    /// ([`Primary::disconnect`](crate::Primary::disconnect), a graceful stop, a rolling
    /// restart, scaling down, a recycle: it answers when its `next` returns
    /// [`Next::Disconnect`](crate::Next::Disconnect)), broke the protocol, or exited.
    ///
    /// The worker may still be alive, finishing the connections it holds: it gets no new
    /// ones, its [`WorkerInfo::connected`](crate::WorkerInfo::connected) is false from now on,
    /// and [`Primary::send`](crate::Primary::send) to it fails with
    /// [`Error::Closed`](crate::Error::Closed). Its `Exit` follows when it exits. For an exit
    /// nobody asked for (a crash, [`Primary::kill`](crate::Primary::kill), the worker function
    /// returning) and for a worker that never answers, both come together at the exit.
    Disconnect {
        /// Worker id.
        id: u32,
    },
    /// A worker exited. Comes after its `Disconnect`, exactly once; the worker is gone from the
    /// table.
    Exit {
        /// Worker id.
        id: u32,
        /// Its pid.
        pid: u32,
        /// Exit code or terminating signal.
        status: ExitStatus,
        /// Whether it was asked to leave or disconnected itself (Node's
        /// `exitedAfterDisconnect`): false for a crash, a kill and a worker function that
        /// returned on its own.
        exited_after_disconnect: bool,
    },
    /// A worker broke the protocol (malformed frame, unexpected fds, a frame only the primary
    /// sends, an announcement twice): its channel was closed and it was sent SIGKILL.
    WorkerError {
        /// Worker id.
        id: u32,
        /// What it sent.
        error: Error,
    },
    /// A crashed worker will be forked again after this delay (crash-loop backoff).
    Backoff {
        /// The delay.
        delay: Duration,
    },
    /// A worker exited with the fatal exit code and is not respawned.
    Fatal {
        /// Worker id.
        id: u32,
        /// The code.
        code: i32,
    },
    /// A worker stopped making progress and was sent SIGABRT (SIGKILL follows).
    Hung {
        /// Worker id.
        id: u32,
    },
    /// A worker reached its connection limit and is being replaced.
    Recycle {
        /// Worker id.
        id: u32,
    },
    /// The wanted number of workers changed.
    Scale {
        /// The new number.
        workers: usize,
    },
    /// Rolling restart progress: `new` is listening and `old` was asked to disconnect.
    Restart {
        /// The worker being replaced.
        old: u32,
        /// Its replacement.
        new: u32,
        /// Workers still to replace.
        remaining: usize,
    },
    /// A rolling restart finished.
    RestartDone,
    /// The cluster is stopping.
    Stopping {
        /// Graceful (drain) or fast (SIGTERM).
        graceful: bool,
    },
    /// A worker could not be forked (no free slot, no fds, no memory): the supervisor tries
    /// again after the minimum backoff.
    SpawnFailed {
        /// The error.
        error: Error,
    },
    /// Accepting paused for a moment after an error such as `EMFILE`; it resumes by itself.
    AcceptPaused {
        /// The error.
        error: Error,
    },
    /// The timeout given to [`Primary::next_event_timeout`](crate::Primary::next_event_timeout) passed with nothing to report.
    Idle,
}

impl core::fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Event::Fork { id, pid } => write!(f, "worker {id} forked (pid {pid})"),
            Event::Online { id } => write!(f, "worker {id} online"),
            Event::Listening { id, addr, .. } => write!(f, "worker {id} listening on {addr}"),
            Event::Message { id, payload, fds } => {
                write!(
                    f,
                    "worker {id} sent {} bytes and {} fds",
                    payload.len(),
                    fds.len()
                )
            }
            Event::Disconnect { id } => write!(f, "worker {id} disconnected"),
            Event::Exit {
                id,
                pid,
                status,
                exited_after_disconnect,
            } => write!(
                f,
                "worker {id} (pid {pid}) exited: {status}{}",
                if *exited_after_disconnect {
                    ""
                } else {
                    " (unexpected)"
                }
            ),
            Event::WorkerError { id, error } => {
                write!(f, "worker {id} broke the protocol: {error}")
            }
            Event::Backoff { delay } => {
                write!(
                    f,
                    "crash loop: respawning in {} ms",
                    delay.as_millis() as u64
                )
            }
            Event::Fatal { id, code } => write!(
                f,
                "worker {id} exited with fatal code {code}: not respawned"
            ),
            Event::Hung { id } => write!(f, "worker {id} hung: sent SIGABRT"),
            Event::Recycle { id } => write!(f, "worker {id} reached max requests: replacing it"),
            Event::Scale { workers } => write!(f, "scaling to {workers} workers"),
            Event::Restart {
                old,
                new,
                remaining,
            } => {
                write!(
                    f,
                    "restart: worker {new} replaces {old} ({remaining} to go)"
                )
            }
            Event::RestartDone => f.write_str("restart done"),
            Event::Stopping { graceful: true } => f.write_str("stopping gracefully"),
            Event::Stopping { graceful: false } => f.write_str("stopping fast"),
            Event::SpawnFailed { error } => write!(f, "could not fork a worker: {error}"),
            Event::AcceptPaused { error } => write!(f, "accept paused: {error}"),
            Event::Idle => f.write_str("idle"),
        }
    }
}

/// Queued events (everything but `Message`, which borrows the receive buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ev {
    Fork(u32, u32),
    Online(u32),
    Listening(u32, usize),
    Disconnect(u32),
    Exit(u32, u32, i32, bool),
    WorkerError(u32, Error),
    Backoff(Duration),
    Fatal(u32, i32),
    Hung(u32),
    Recycle(u32),
    Scale(usize),
    Restart(u32, u32, usize),
    RestartDone,
    Stopping(bool),
    SpawnFailed(Error),
    AcceptPaused(Error),
}

impl Ev {
    /// The public form of a queued event (the listener's address is borrowed from `listeners`).
    pub(crate) fn public(self, listeners: &[Listener]) -> Event<'_> {
        match self {
            Ev::Fork(id, pid) => Event::Fork { id, pid },
            Ev::Online(id) => Event::Online { id },
            Ev::Listening(id, listener) => Event::Listening {
                id,
                listener,
                addr: &listeners[listener].addr,
            },
            Ev::Disconnect(id) => Event::Disconnect { id },
            Ev::Exit(id, pid, raw, after) => Event::Exit {
                id,
                pid,
                status: ExitStatus::from_raw(raw),
                exited_after_disconnect: after,
            },
            Ev::WorkerError(id, error) => Event::WorkerError { id, error },
            Ev::Backoff(delay) => Event::Backoff { delay },
            Ev::Fatal(id, code) => Event::Fatal { id, code },
            Ev::Hung(id) => Event::Hung { id },
            Ev::Recycle(id) => Event::Recycle { id },
            Ev::Scale(workers) => Event::Scale { workers },
            Ev::Restart(old, new, remaining) => Event::Restart {
                old,
                new,
                remaining,
            },
            Ev::RestartDone => Event::RestartDone,
            Ev::Stopping(graceful) => Event::Stopping { graceful },
            Ev::SpawnFailed(error) => Event::SpawnFailed { error },
            Ev::AcceptPaused(error) => Event::AcceptPaused { error },
        }
    }
}

/// The events waiting for the application, and the counters they feed.
pub(crate) struct Events {
    pub(crate) queue: VecDeque<Ev>,
    pub(crate) stats: ClusterStats,
}

impl Events {
    /// An empty queue with room for `cap` events.
    pub(crate) fn with_capacity(cap: usize) -> Events {
        Events {
            queue: VecDeque::with_capacity(cap),
            stats: ClusterStats::default(),
        }
    }

    /// Queues an event for the application and counts it.
    pub(crate) fn push(&mut self, ev: Ev) {
        let c = &mut self.stats;
        match ev {
            Ev::Fork(..) => c.forks += 1,
            Ev::Exit(_, _, _, after) => {
                c.exits += 1;
                c.crashes += u64::from(!after);
            }
            Ev::Backoff(_) => c.backoffs += 1,
            Ev::Hung(_) => c.hung += 1,
            Ev::Recycle(_) => c.recycled += 1,
            Ev::Restart(..) => c.restarted += 1,
            Ev::WorkerError(..) => c.protocol_errors += 1,
            Ev::AcceptPaused(_) => c.accept_pauses += 1,
            Ev::SpawnFailed(_) => c.spawn_failures += 1,
            _ => {}
        }
        self.queue.push_back(ev);
    }
}
