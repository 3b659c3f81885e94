//! The primary: one epoll loop over the listeners, every worker's channel and the signal fd; the
//! worker table; lifecycle events; round-robin dispatch; supervision.

use core::sync::atomic::Ordering;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use arrayvec::ArrayVec;
use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;
use rustix::process::{Pid, Signal, WaitOptions};

use crate::channel::{Channel, Received, RecvBuf, Taken};
use crate::cluster::{Family, ListenAddr, Listener, Schedule, Settings, WorkerFn};
use crate::error::{Call, Error, Result};
use crate::frame::{self, Frame, Kind, MAX_FDS, MAX_PAYLOAD};
use crate::sys::{self, Forked, SharedSlots, SignalSet};
use crate::worker::{Worker, WorkerInit, SLOT_WORDS, W_BEAT, W_CONNS, W_MSGS};

const TAG_LISTENER: u64 = 1 << 56;
const TAG_SIGNAL: u64 = 2 << 56;
const TAG_WORKER: u64 = 3 << 56;
const TAG_MASK: u64 = 0xff << 56;
/// Accepted connections the primary queues while no worker can take one; past this it stops
/// accepting and lets the kernel's backlog hold the rest.
const PENDING_MAX: usize = 1024;
/// Connections accepted per listener wakeup before the loop looks at other fds.
const ACCEPT_BUDGET: usize = 64;
/// Frames read from one worker per wakeup before the loop looks at other fds.
const FRAME_BUDGET: usize = 64;
const EPOLL_EVENTS: usize = 64;
/// Send-buffer bytes per connection frame of the in-flight bound: the kernel doubles the value
/// set and charges a queued 18-byte frame with one fd about 745 bytes (measured: a doubled
/// buffer of 8192 holds 11 such frames). The kernel's floor (4608) holds 6.
const SNDBUF_PER_FRAME: usize = 376;
const TICK: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A worker's lifecycle state, as the primary sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked; not yet running the worker function.
    Forked,
    /// Running (sent `Online`).
    Online,
    /// Taking connections (sent `Listening`).
    Listening,
    /// Asked to disconnect, or its channel closed; finishing.
    Disconnecting,
}

/// A row of the worker table.
#[derive(Debug, Clone, Copy)]
pub struct WorkerInfo {
    /// Id, from 1, never reused while the primary lives.
    pub id: u32,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: State,
    /// Whether its channel is open.
    pub connected: bool,
    /// Whether it was asked to leave (disconnect, kill, restart, stop).
    pub exited_after_disconnect: bool,
    /// Time since fork.
    pub uptime: Duration,
    /// Connections it took (round-robin: handed to it; shared: it accepted).
    pub connections: u64,
    /// Messages it received from the primary.
    pub messages: u64,
    /// Bytes of frames queued for it that it has not read yet (connection hand-offs are 18
    /// bytes each).
    pub queued_bytes: usize,
    /// Time since its heartbeat last moved.
    pub since_heartbeat: Duration,
}

/// Counters of the whole cluster since the primary started (see [`Primary::stats`]).
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
    /// A worker's channel closed.
    Disconnect {
        /// Worker id.
        id: u32,
    },
    /// A worker exited. Comes after its `Disconnect`, exactly once.
    Exit {
        /// Worker id.
        id: u32,
        /// Its pid.
        pid: u32,
        /// Exit code or terminating signal.
        status: ExitStatus,
        /// Whether it was asked to leave (Node's `exitedAfterDisconnect`): false for a crash.
        exited_after_disconnect: bool,
    },
    /// A worker broke the protocol (malformed frame, unexpected fds); its channel was closed and
    /// it will be killed if it does not exit.
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
    /// Accepting paused for a moment after an error such as `EMFILE`; it resumes by itself.
    AcceptPaused {
        /// The error.
        error: Error,
    },
    /// The timeout given to [`Primary::next_event_timeout`] passed with nothing to report.
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
            Event::AcceptPaused { error } => write!(f, "accept paused: {error}"),
            Event::Idle => f.write_str("idle"),
        }
    }
}

/// Queued events (everything but `Message`, which borrows the receive buffer).
#[derive(Debug, Clone, Copy)]
enum Ev {
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
    AcceptPaused(Error),
}

struct W {
    id: u32,
    pid: Pid,
    chan: Option<Channel>,
    state: State,
    /// A duplicate of the worker's end of the channel. Connections handed over but not yet
    /// received stay in that end's queue; if the worker dies, the primary reads them back from
    /// it and hands them to another worker. Holding it also keeps the channel from reporting
    /// end of file: the primary learns of a worker's death from SIGCHLD.
    peer: Option<Channel>,
    in_ready: bool,
    /// It became ready (listening; or online, without listeners) at least once.
    ready: bool,
    /// Its queue is full (`EAGAIN`): it gets more when the channel is writable again.
    blocked: bool,
    /// A `Disconnect` waits for room in its queue.
    disconnect_pending: bool,
    after_disconnect: bool,
    started: Instant,
    kill_at: Option<(Instant, Signal)>,
    status: Option<i32>,
    reaped_at: Option<Instant>,
    /// The worker this one replaces once ready, and whether that is a rolling-restart step.
    replaces: Option<(u32, bool)>,
    replaced: bool,
    dispatched: u64,
    max_conns: u64,
    beat: u64,
    beat_seen: Instant,
    hung: bool,
}

impl W {
    /// Signals the worker, unless it was reaped already: after `waitpid` its pid may belong to
    /// another process, so a reaped worker is never signalled (before, its zombie holds the pid).
    fn signal(&self, sig: Signal) -> rustix::io::Result<()> {
        match self.status {
            None => rustix::process::kill_process(self.pid, sig),
            Some(_) => Ok(()),
        }
    }
}

/// The events waiting for the application, and the counters they feed.
struct Events {
    queue: VecDeque<Ev>,
    stats: ClusterStats,
}

impl Events {
    /// Queues an event for the application and counts it.
    fn push(&mut self, ev: Ev) {
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
            _ => {}
        }
        self.queue.push_back(ev);
    }
}

struct Slot {
    gen: u32,
    w: Option<W>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    Stopping { graceful: bool },
}

/// The primary process's handle on the cluster: the worker table and the event loop.
///
/// Created by [`Builder::start`](crate::Builder::start). Read events with
/// [`next_event`](Self::next_event); it returns `None` once the cluster has stopped and every
/// worker is gone. Dropping the primary kills and reaps any worker still alive.
pub struct Primary {
    epoll: Option<OwnedFd>,
    sigfd: Option<OwnedFd>,
    sigset: SignalSet,
    ignored: ArrayVec<i32, 64>,
    me: Pid,
    listeners: Vec<Listener>,
    armed: bool,
    rearm_at: Option<Instant>,
    settings: Settings,
    slots: Vec<Slot>,
    next_id: u32,
    ready: VecDeque<(u32, u32)>,
    pending: VecDeque<(OwnedFd, u16)>,
    events: Events,
    evbuf: Box<[epoll::Event; EPOLL_EVENTS]>,
    ev_pos: usize,
    ev_len: usize,
    rbuf: Box<RecvBuf>,
    worker_fn: WorkerFn,
    shm: Rc<SharedSlots>,
    run: Run,
    desired: usize,
    alive: usize,
    crash_streak: u32,
    /// When the last worker died young (a crash of the streak).
    last_crash: Option<Instant>,
    respawn_at: Option<Instant>,
    restart_queue: VecDeque<u32>,
    restart_active: usize,
    tick_at: Option<Instant>,
    seq: u32,
    rng: u64,
    accept_flags: SocketFlags,
}

impl Primary {
    pub(crate) fn start(
        settings: Settings,
        listeners: Vec<Listener>,
        n: usize,
        worker_fn: WorkerFn,
    ) -> Result<Primary> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).call("epoll_create1")?;
        let mut sigs: ArrayVec<i32, 8> = ArrayVec::new();
        sigs.push(libc::SIGCHLD);
        if settings.sup.signals {
            sigs.extend([
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGHUP,
                libc::SIGTTIN,
                libc::SIGTTOU,
            ]);
        }
        let mut ignored = ArrayVec::new();
        for s in 1..32 {
            if sys::is_ignored(s) {
                ignored.push(s);
            }
        }
        let mut sigset = SignalSet::new(&sigs);
        let sigfd = sigset.block_and_open()?;
        epoll::add(
            &epoll,
            &sigfd,
            epoll::EventData::new_u64(TAG_SIGNAL),
            epoll::EventFlags::IN,
        )
        .call("epoll_ctl")?;
        let rr = settings.schedule == Schedule::RoundRobin;
        if rr {
            for (i, l) in listeners.iter().enumerate() {
                epoll::add(
                    &epoll,
                    &l.fd,
                    epoll::EventData::new_u64(TAG_LISTENER | i as u64),
                    epoll::EventFlags::IN,
                )
                .call("epoll_ctl")?;
            }
        }
        let max = settings.max_workers;
        let shm = Rc::new(SharedSlots::new(max * SLOT_WORDS)?);
        let accept_flags = if settings.nonblocking {
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK
        } else {
            SocketFlags::CLOEXEC
        };
        let me = rustix::process::getpid();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (me.as_raw_nonzero().get() as u64) << 32
            | 1;
        let mut p = Primary {
            epoll: Some(epoll),
            sigfd: Some(sigfd),
            sigset,
            ignored,
            me,
            listeners,
            armed: true,
            rearm_at: None,
            slots: Vec::with_capacity(max),
            next_id: 1,
            ready: VecDeque::with_capacity(max),
            pending: VecDeque::with_capacity(PENDING_MAX + max * settings.in_flight),
            events: Events {
                queue: VecDeque::with_capacity(8 * max + 64),
                stats: ClusterStats::default(),
            },
            evbuf: Box::new(
                [epoll::Event {
                    flags: epoll::EventFlags::empty(),
                    data: epoll::EventData::new_u64(0),
                }; EPOLL_EVENTS],
            ),
            ev_pos: 0,
            ev_len: 0,
            rbuf: Box::new(RecvBuf::new()),
            worker_fn,
            shm,
            run: Run::Running,
            desired: n,
            alive: 0,
            crash_streak: 0,
            last_crash: None,
            respawn_at: None,
            restart_queue: VecDeque::with_capacity(max),
            restart_active: 0,
            tick_at: None,
            seq: 0,
            rng: seed,
            accept_flags,
            settings,
        };
        for _ in 0..n {
            p.spawn(&[], None)?;
        }
        p.schedule_tick(Instant::now());
        Ok(p)
    }

    // ----- public control -------------------------------------------------------------------

    /// The next event, waiting for one. `None` once the cluster has stopped and every worker
    /// has exited.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>> {
        self.wait(None)
    }

    /// Like [`next_event`](Self::next_event), but returns [`Event::Idle`] when `timeout` passes
    /// first (for a primary that does its own periodic work without a thread).
    pub fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<Event<'_>>> {
        self.wait(Some(Instant::now() + timeout))
    }

    /// Like [`next_event_timeout`](Self::next_event_timeout) with an absolute deadline.
    pub fn next_event_until(&mut self, deadline: Instant) -> Result<Option<Event<'_>>> {
        self.wait(Some(deadline))
    }

    /// Forks one more worker (the wanted count grows by one). Returns its id.
    pub fn fork(&mut self) -> Result<u32> {
        self.fork_with_env(&[])
    }

    /// Forks one more worker with extra environment variables (Node's `cluster.fork(env)`).
    pub fn fork_with_env(&mut self, env: &[(&str, &str)]) -> Result<u32> {
        if self.run != Run::Running {
            return Err(Error::Invalid("the cluster is stopping"));
        }
        let id = self.spawn(env, None)?;
        self.desired = self.desired.max(self.active());
        Ok(id)
    }

    /// Sends bytes to one worker (a [`Next::Message`](crate::Next::Message) there). Never
    /// blocks: a worker whose channel is full gives an error with
    /// [`Error::is_would_block`].
    pub fn send(&mut self, id: u32, payload: &[u8]) -> Result<()> {
        self.send_with_fds(id, payload, &[])
    }

    /// Sends bytes and fds to one worker.
    pub fn send_with_fds(&mut self, id: u32, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Capacity("message payload larger than MAX_PAYLOAD"));
        }
        if fds.len() > MAX_FDS {
            return Err(Error::Capacity("more than MAX_FDS fds"));
        }
        let slot = self.find(id).ok_or(Error::NoSuchWorker(id))?;
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(Kind::Message, self.seq, payload).with_fds(fds.len() as u8);
        let w = self.slots[slot].w.as_ref().ok_or(Error::NoSuchWorker(id))?;
        let chan = w.chan.as_ref().ok_or(Error::NoSuchWorker(id))?;
        chan.try_send(&frame, fds)
    }

    /// Sends bytes to every connected worker; returns how many it reached.
    pub fn broadcast(&mut self, payload: &[u8]) -> Result<usize> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Capacity("message payload larger than MAX_PAYLOAD"));
        }
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(Kind::Message, self.seq, payload);
        let mut n = 0;
        for s in &self.slots {
            if let Some(chan) = s.w.as_ref().and_then(|w| w.chan.as_ref()) {
                if chan.try_send(&frame, &[]).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Sends `signal` to a worker (Node's `worker.kill`). As in Node, its exit is not a planned
    /// one (`exited_after_disconnect` is false) and, with respawn on, it is replaced; to retire a
    /// worker for good use [`disconnect`](Self::disconnect) or [`scale`](Self::scale).
    pub fn kill(&mut self, id: u32, signal: Signal) -> Result<()> {
        let slot = self.find(id).ok_or(Error::NoSuchWorker(id))?;
        let w = self.slots[slot].w.as_ref().ok_or(Error::NoSuchWorker(id))?;
        w.signal(signal).call("kill")
    }

    /// Asks a worker to stop taking work, finish and exit (Node's `worker.disconnect`). It is
    /// killed if it is still alive after the graceful timeout.
    pub fn disconnect(&mut self, id: u32) -> Result<()> {
        let slot = self.find(id).ok_or(Error::NoSuchWorker(id))?;
        // Asked to leave, so not replaced (respawn is for exits nobody asked for): one worker
        // fewer is wanted, as with `scale`.
        if self.slots[slot]
            .w
            .as_ref()
            .is_some_and(|w| !w.after_disconnect && !w.replaced && w.chan.is_some())
        {
            self.desired = self.desired.saturating_sub(1);
        }
        self.disconnect_slot(slot, self.settings.sup.graceful_timeout);
        Ok(())
    }

    /// Disconnects every worker and stops the cluster gracefully (Node's
    /// `cluster.disconnect()`). [`next_event`](Self::next_event) returns `None` when all are
    /// gone.
    pub fn disconnect_all(&mut self) {
        self.stop(true);
    }

    /// Stops the cluster: graceful (stop accepting, disconnect every worker, SIGKILL after the
    /// graceful timeout) or fast (SIGTERM, then SIGKILL after the fast timeout). A graceful stop
    /// while one is under way turns fast.
    pub fn stop(&mut self, graceful: bool) {
        let graceful = graceful && self.run == Run::Running;
        if self.run == (Run::Stopping { graceful: false }) {
            return;
        }
        self.run = Run::Stopping { graceful };
        self.events.push(Ev::Stopping(graceful));
        self.restart_queue.clear();
        self.respawn_at = None;
        self.close_listeners();
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if self.slots[slot].w.is_none() {
                continue;
            }
            if graceful {
                self.disconnect_slot(slot, self.settings.sup.graceful_timeout);
            } else {
                self.retire(slot);
                let fast = self.settings.sup.fast_timeout;
                if let Some(w) = self.slots[slot].w.as_mut() {
                    let _ = w.signal(Signal::TERM);
                    w.kill_at = Some((now + fast, Signal::KILL));
                }
                self.arm_tick(now + fast);
            }
        }
    }

    /// Replaces every worker, `restart_batch` at a time: the new one is listening before the old
    /// one is disconnected, so no connection is refused or dropped.
    pub fn restart(&mut self) {
        if self.run != Run::Running {
            return;
        }
        self.restart_queue.clear();
        for s in &self.slots {
            if let Some(w) = &s.w {
                if !w.after_disconnect {
                    self.restart_queue.push_back(w.id);
                }
            }
        }
        self.step_restart();
    }

    /// Sets the wanted number of workers (at least 1): forks or disconnects the difference.
    pub fn scale(&mut self, n: usize) -> Result<()> {
        if self.run != Run::Running {
            return Err(Error::Invalid("the cluster is stopping"));
        }
        let n = n.clamp(1, self.settings.max_workers);
        self.desired = n;
        self.events.push(Ev::Scale(n));
        while self.active() > n {
            // The newest worker goes first.
            let Some(slot) = (0..self.slots.len())
                .filter(|&s| {
                    self.slots[s]
                        .w
                        .as_ref()
                        .is_some_and(|w| !w.after_disconnect)
                })
                .max_by_key(|&s| self.slots[s].w.as_ref().map_or(0, |w| w.id))
            else {
                break;
            };
            self.disconnect_slot(slot, self.settings.sup.graceful_timeout);
        }
        self.manage(Instant::now())
    }

    /// The wanted number of workers.
    pub fn wanted_workers(&self) -> usize {
        self.desired
    }

    /// The worker table: every worker alive (not yet reported by `Exit`).
    pub fn workers(&self) -> impl Iterator<Item = WorkerInfo> + '_ {
        let now = Instant::now();
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| s.w.as_ref().map(|w| self.info(i, w, now)))
    }

    /// One worker's row, if it is alive.
    pub fn worker(&self, id: u32) -> Option<WorkerInfo> {
        let slot = self.find(id)?;
        self.slots[slot]
            .w
            .as_ref()
            .map(|w| self.info(slot, w, Instant::now()))
    }

    /// The listeners' addresses, by index (the real port when the builder asked for port 0).
    pub fn listen_addrs(&self) -> impl Iterator<Item = &ListenAddr> {
        self.listeners.iter().map(|l| &l.addr)
    }

    /// Counters of the whole cluster: forks, exits, crashes, backoffs, hung and recycled workers,
    /// restarts, protocol errors, connections handed out. Per-worker counters are in
    /// [`workers`](Self::workers). Neither allocates.
    pub fn stats(&self) -> ClusterStats {
        self.events.stats
    }

    /// Whether a stop is under way.
    pub fn is_stopping(&self) -> bool {
        self.run != Run::Running
    }

    // ----- internals: the loop ----------------------------------------------------------------

    fn info(&self, slot: usize, w: &W, now: Instant) -> WorkerInfo {
        let base = slot * SLOT_WORDS;
        let shm = self.shm.slots();
        let connections = match self.settings.schedule {
            Schedule::RoundRobin => w.dispatched,
            Schedule::Shared => shm[base + W_CONNS].load(Ordering::Relaxed),
        };
        WorkerInfo {
            id: w.id,
            pid: w.pid.as_raw_nonzero().get() as u32,
            state: w.state,
            connected: w.chan.is_some(),
            exited_after_disconnect: w.after_disconnect,
            uptime: now.saturating_duration_since(w.started),
            connections,
            messages: shm[base + W_MSGS].load(Ordering::Relaxed),
            queued_bytes: w
                .peer
                .as_ref()
                .map_or(0, |p| rustix::io::ioctl_fionread(p).unwrap_or(0) as usize),
            since_heartbeat: now.saturating_duration_since(w.beat_seen),
        }
    }

    /// Workers that count towards the wanted number: connected and not asked to leave. A
    /// reaped worker counts until its `Exit` is reported, so that its respawn (and backoff) is
    /// decided once, in order.
    fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.w.as_ref()
                    .is_some_and(|w| !w.after_disconnect && w.chan.is_some())
            })
            .count()
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.w.as_ref().is_some_and(|w| w.id == id))
    }

    fn wait(&mut self, deadline: Option<Instant>) -> Result<Option<Event<'_>>> {
        loop {
            if let Some(ev) = self.events.queue.pop_front() {
                return Ok(Some(self.public(ev)));
            }
            if self.run != Run::Running && self.alive == 0 {
                return Ok(None);
            }
            if self.ev_pos < self.ev_len {
                let e = self.evbuf[self.ev_pos];
                self.ev_pos += 1;
                let data = e.data.u64();
                let flags = { e.flags };
                match data & TAG_MASK {
                    TAG_LISTENER => self.on_listener((data & 0xffff) as usize),
                    TAG_SIGNAL => self.on_signal()?,
                    TAG_WORKER => {
                        let slot = (data & 0xff_ffff) as usize;
                        let gen = ((data >> 24) & 0xffff_ffff) as u32;
                        if flags.contains(epoll::EventFlags::OUT) {
                            self.on_writable(slot, gen);
                        }
                        let readable =
                            epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR;
                        if !flags.intersects(readable) {
                            continue;
                        }
                        if let Some((id, len, fds)) = self.on_channel(slot, gen) {
                            return Ok(Some(Event::Message {
                                id,
                                payload: self.rbuf.payload(len),
                                fds,
                            }));
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let now = Instant::now();
            if self.tick_at.is_some_and(|t| t <= now) {
                self.on_tick(now)?;
                continue;
            }
            if deadline.is_some_and(|d| d <= now) {
                return Ok(Some(Event::Idle));
            }
            let until = match (self.tick_at, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = until.map(|t| {
                let d = t.saturating_duration_since(now);
                rustix::time::Timespec {
                    tv_sec: d.as_secs() as i64,
                    tv_nsec: d.subsec_nanos() as i64,
                }
            });
            let Some(ep) = self.epoll.as_ref() else {
                return Err(Error::Invalid("primary state used in a worker"));
            };
            match epoll::wait(ep, &mut *self.evbuf, timeout.as_ref()) {
                Ok(n) => {
                    self.ev_len = n;
                    self.ev_pos = 0;
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(Error::os("epoll_wait", e)),
            }
        }
    }

    fn public(&self, ev: Ev) -> Event<'_> {
        match ev {
            Ev::Fork(id, pid) => Event::Fork { id, pid },
            Ev::Online(id) => Event::Online { id },
            Ev::Listening(id, listener) => Event::Listening {
                id,
                listener,
                addr: &self.listeners[listener].addr,
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
            Ev::AcceptPaused(error) => Event::AcceptPaused { error },
        }
    }

    fn arm_tick(&mut self, at: Instant) {
        self.tick_at = Some(self.tick_at.map_or(at, |t| t.min(at)));
    }

    fn schedule_tick(&mut self, now: Instant) {
        let sup = &self.settings.sup;
        let periodic = sup.hang_timeout.is_some()
            || (sup.max_requests.is_some() && self.settings.schedule == Schedule::Shared)
            || self.rearm_at.is_some()
            || self.respawn_at.is_some()
            || self.run != Run::Running
            || self.slots.iter().any(|s| {
                s.w.as_ref()
                    .is_some_and(|w| w.kill_at.is_some() || w.reaped_at.is_some())
            });
        self.tick_at = if periodic { Some(now + TICK) } else { None };
    }

    // ----- internals: listeners and dispatch ------------------------------------------------

    fn on_listener(&mut self, i: usize) {
        if !self.armed || i >= self.listeners.len() {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            if self.pending.len() >= PENDING_MAX {
                self.disarm(None);
                return;
            }
            let r = rustix::net::accept_with(&self.listeners[i].fd, self.accept_flags);
            match r {
                Ok(fd) => {
                    if self.pending.is_empty() {
                        if let Err(back) = self.dispatch(fd, i as u16) {
                            self.pending.push_back(back);
                        }
                    } else {
                        self.pending.push_back((fd, i as u16));
                    }
                }
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR) | Err(Errno::CONNABORTED) | Err(Errno::PROTO) => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM...: no busy loop; connections wait in the
                    // kernel's backlog and accepting resumes after a pause.
                    self.disarm(Some(Error::os("accept4", e)));
                    return;
                }
            }
        }
    }

    fn disarm(&mut self, error: Option<Error>) {
        if self.armed {
            self.armed = false;
            for l in &self.listeners {
                if let Some(ep) = &self.epoll {
                    let _ = epoll::modify(
                        ep,
                        &l.fd,
                        epoll::EventData::new_u64(0),
                        epoll::EventFlags::empty(),
                    );
                }
            }
            if let Some(e) = error {
                self.events.push(Ev::AcceptPaused(e));
            }
        }
        if error.is_some() {
            let at = Instant::now() + ACCEPT_PAUSE;
            self.rearm_at = Some(at);
            self.arm_tick(at);
        }
    }

    fn rearm(&mut self) {
        if self.armed || self.run != Run::Running || self.settings.schedule != Schedule::RoundRobin
        {
            return;
        }
        self.armed = true;
        self.rearm_at = None;
        for (i, l) in self.listeners.iter().enumerate() {
            let Some(ep) = &self.epoll else { return };
            let _ = epoll::modify(
                ep,
                &l.fd,
                epoll::EventData::new_u64(TAG_LISTENER | i as u64),
                epoll::EventFlags::IN,
            );
        }
    }

    /// Hands `fd` to the next ready worker; gives it back when none can take it.
    ///
    /// The primary's copy is closed as soon as the frame is queued: the connection now lives in
    /// the worker's channel queue, which the primary can still read if the worker dies first.
    fn dispatch(&mut self, fd: OwnedFd, li: u16) -> core::result::Result<(), (OwnedFd, u16)> {
        while let Some((slot, gen)) = self.ready.pop_front() {
            let s = &mut self.slots[slot as usize];
            let Some(w) = s.w.as_mut().filter(|_| s.gen == gen) else {
                continue;
            };
            w.in_ready = false;
            let Some(chan) = w.chan.as_ref() else {
                continue;
            };
            self.seq = self.seq.wrapping_add(1);
            let idx = li.to_le_bytes();
            match chan.try_send(&Frame::new(Kind::Connection, self.seq, &idx), &[fd.as_fd()]) {
                Ok(()) => {
                    drop(fd);
                    w.dispatched += 1;
                    self.events.stats.connections += 1;
                    let recycle = w.dispatched == w.max_conns && !w.replaced && !w.after_disconnect;
                    if w.state == State::Listening && !w.after_disconnect {
                        w.in_ready = true;
                        self.ready.push_back((slot, gen));
                    }
                    if recycle {
                        self.recycle(slot as usize);
                    }
                    return Ok(());
                }
                // Its queue holds as much as the in-flight bound allows: no more work for it until
                // it reads some (EPOLLOUT on its channel).
                Err(e) if e.is_would_block() => {
                    w.blocked = true;
                    watch(self.epoll.as_ref(), chan, slot as usize, gen, true);
                }
                Err(_) => {}
            }
        }
        Err((fd, li))
    }

    /// The worker's queue drained below the bound.
    fn on_writable(&mut self, slot: usize, gen: u32) {
        let Some(w) = self
            .slots
            .get_mut(slot)
            .filter(|s| s.gen == gen)
            .and_then(|s| s.w.as_mut())
        else {
            return;
        };
        if !w.blocked {
            return;
        }
        if w.disconnect_pending {
            let Some(chan) = &w.chan else { return };
            match chan.try_send(&Frame::new(Kind::Disconnect, 0, &[]), &[]) {
                Err(e) if e.is_would_block() => return,
                _ => w.disconnect_pending = false,
            }
        }
        w.blocked = false;
        if let Some(chan) = &w.chan {
            watch(self.epoll.as_ref(), chan, slot, gen, false);
        }
        self.make_ready(slot);
        self.drain_pending();
    }

    fn drain_pending(&mut self) {
        while let Some((fd, li)) = self.pending.pop_front() {
            if let Err(back) = self.dispatch(fd, li) {
                self.pending.push_front(back);
                break;
            }
        }
        if !self.armed && self.rearm_at.is_none() && self.pending.len() < PENDING_MAX / 2 {
            self.rearm();
        }
    }

    fn make_ready(&mut self, slot: usize) {
        let gen = self.slots[slot].gen;
        if let Some(w) = self.slots[slot].w.as_mut() {
            if !w.in_ready
                && !w.blocked
                && w.state == State::Listening
                && !w.after_disconnect
                && w.status.is_none()
                && w.chan.is_some()
            {
                w.in_ready = true;
                self.ready.push_back((slot as u32, gen));
            }
        }
    }

    fn unready(&mut self, slot: usize) {
        if let Some(w) = self.slots[slot].w.as_mut() {
            if w.in_ready {
                w.in_ready = false;
                self.ready.retain(|&(s, _)| s as usize != slot);
            }
        }
    }

    /// A dead worker's connections that it never received: read them back from its end of the
    /// channel and queue them for the other workers. Anything else queued for it is dropped.
    fn recover(&mut self, slot: usize) {
        self.unready(slot);
        let Some(peer) = self.slots[slot].w.as_mut().and_then(|w| w.peer.take()) else {
            return;
        };
        loop {
            match peer.try_recv(&mut self.rbuf) {
                Ok(Some(mut r)) => {
                    if r.frame.kind() == Kind::Connection {
                        if let Some(fd) = r.fds.pop() {
                            self.pending
                                .push_back((fd, r.frame.listener().unwrap_or(0)));
                            self.events.stats.recovered += 1;
                        }
                    }
                }
                Ok(None) | Err(Error::Closed) => break,
                // Our own frames always decode; anything else is skipped.
                Err(_) => continue,
            }
        }
    }

    fn close_listeners(&mut self) {
        if self.settings.schedule == Schedule::RoundRobin && self.armed {
            // Take what the kernel already accepted, so that nothing in the backlog is reset.
            for i in 0..self.listeners.len() {
                while let Ok(fd) =
                    rustix::net::accept_with(&self.listeners[i].fd, self.accept_flags)
                {
                    self.pending.push_back((fd, i as u16));
                }
            }
            self.drain_pending();
        }
        self.armed = false;
        if let Some(ep) = &self.epoll {
            for l in &self.listeners {
                let _ = epoll::delete(ep, &l.fd);
            }
        }
        // Connections accepted before the stop that no worker could take yet (every queue at
        // its bound) are handed out past the bound: they were accepted, so they are answered.
        // A worker whose queue stays full for a second does not get them.
        let until = Instant::now() + Duration::from_secs(1);
        'conns: while let Some((fd, li)) = self.pending.pop_front() {
            let idx = li.to_le_bytes();
            loop {
                for s in &self.slots {
                    let Some(chan) =
                        s.w.as_ref()
                            .filter(|w| w.state == State::Listening)
                            .and_then(|w| w.chan.as_ref())
                    else {
                        continue;
                    };
                    if chan
                        .try_send(&Frame::new(Kind::Connection, 0, &idx), &[fd.as_fd()])
                        .is_ok()
                    {
                        continue 'conns;
                    }
                }
                if Instant::now() >= until {
                    break 'conns;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.pending.clear();
    }

    // ----- internals: workers ---------------------------------------------------------------

    fn on_channel(
        &mut self,
        slot: usize,
        gen: u32,
    ) -> Option<(u32, usize, ArrayVec<OwnedFd, MAX_FDS>)> {
        for _ in 0..FRAME_BUDGET {
            // Events queued by the frames read so far go out first, and the loop comes back
            // for the rest: a message must not overtake the `Online` or `Listening` before it.
            if !self.events.queue.is_empty() {
                self.ev_pos -= 1;
                return None;
            }
            let s = self.slots.get(slot)?;
            if s.gen != gen {
                return None;
            }
            let w = s.w.as_ref()?;
            let chan = w.chan.as_ref()?;
            let id = w.id;
            let got = chan.try_recv(&mut self.rbuf).map(|r| r.map(Received::take));
            match got {
                Ok(None) => {
                    // A dead worker's channel is closed once everything it sent was read.
                    if self.slots[slot]
                        .w
                        .as_ref()
                        .is_some_and(|w| w.status.is_some())
                    {
                        self.channel_closed(slot);
                    }
                    return None;
                }
                Ok(Some(Taken {
                    kind,
                    listener,
                    len,
                    fds,
                })) => match kind {
                    Kind::Message => {
                        // Come back to this channel for the frames behind this one.
                        self.ev_pos -= 1;
                        return Some((id, len, fds));
                    }
                    Kind::Online => {
                        let w = self.slots[slot].w.as_mut()?;
                        if w.state == State::Forked {
                            w.state = State::Online;
                        }
                        self.events.push(Ev::Online(id));
                    }
                    Kind::Listening => {
                        let li = listener.unwrap_or(u16::MAX) as usize;
                        if li == frame::NO_LISTENER as usize && self.listeners.is_empty() {
                            // A worker of a cluster without listeners reached its loop.
                            let w = self.slots[slot].w.as_mut()?;
                            if !w.ready {
                                w.ready = true;
                                w.beat_seen = Instant::now();
                                self.replacement_ready(slot);
                            }
                            continue;
                        }
                        if li >= self.listeners.len() {
                            self.worker_error(
                                slot,
                                Error::Invalid("Listening for a listener that does not exist"),
                            );
                            return None;
                        }
                        self.events.push(Ev::Listening(id, li));
                        let w = self.slots[slot].w.as_mut()?;
                        if matches!(w.state, State::Forked | State::Online) {
                            w.state = State::Listening;
                            w.ready = true;
                            w.beat_seen = Instant::now();
                            self.make_ready(slot);
                            self.drain_pending();
                            self.replacement_ready(slot);
                        }
                    }
                    // Acknowledgements are optional on the wire (see `frame`); counters live in
                    // shared memory.
                    Kind::Ack | Kind::Stats => {}
                    Kind::Close => {
                        self.channel_closed(slot);
                        return None;
                    }
                    Kind::Connection | Kind::Disconnect => {
                        self.worker_error(
                            slot,
                            Error::Invalid("a worker sent a primary-only frame kind"),
                        );
                        return None;
                    }
                },
                Err(Error::Closed) => {
                    self.channel_closed(slot);
                    return None;
                }
                Err(e) => {
                    self.worker_error(slot, e);
                    return None;
                }
            }
        }
        // Budget used up: come back after the other ready fds.
        None
    }

    fn worker_error(&mut self, slot: usize, error: Error) {
        let Some(w) = self.slots[slot].w.as_mut() else {
            return;
        };
        self.events.push(Ev::WorkerError(w.id, error));
        let at = Instant::now() + self.settings.sup.fast_timeout;
        if w.kill_at.is_none() {
            w.kill_at = Some((at, Signal::KILL));
        }
        self.arm_tick(at);
        self.channel_closed(slot);
    }

    /// The primary's end of a worker's channel is done with: the worker exited (and all it sent
    /// was read), sent `Close`, or broke the protocol.
    fn channel_closed(&mut self, slot: usize) {
        self.unready(slot);
        let Some(w) = self.slots[slot].w.as_mut() else {
            return;
        };
        if let Some(chan) = w.chan.take() {
            if let Some(ep) = &self.epoll {
                let _ = epoll::delete(ep, &chan);
            }
            drop(chan);
            w.state = State::Disconnecting;
            self.events.push(Ev::Disconnect(w.id));
        }
        if w.status.is_some() {
            self.finish(slot);
        }
        self.drain_pending();
        if self.run == Run::Running {
            let _ = self.manage(Instant::now());
        }
    }

    /// Marks a worker as leaving on purpose and stops handing it work.
    fn retire(&mut self, slot: usize) {
        self.unready(slot);
        if let Some(w) = self.slots[slot].w.as_mut() {
            w.after_disconnect = true;
        }
    }

    fn disconnect_slot(&mut self, slot: usize, timeout: Duration) {
        self.retire(slot);
        let gen = self.slots[slot].gen;
        let Some(w) = self.slots[slot].w.as_mut() else {
            return;
        };
        if let Some(chan) = &w.chan {
            self.seq = self.seq.wrapping_add(1);
            match chan.try_send(&Frame::new(Kind::Disconnect, self.seq, &[]), &[]) {
                Ok(()) => {}
                // Its queue is full: the request goes out, after what is queued, as soon as
                // the channel is writable.
                Err(e) if e.is_would_block() => {
                    w.disconnect_pending = true;
                    w.blocked = true;
                    watch(self.epoll.as_ref(), chan, slot, gen, true);
                }
                Err(_) => {
                    let _ = w.signal(Signal::TERM);
                }
            }
        }
        w.state = State::Disconnecting;
        let at = Instant::now() + timeout;
        if w.kill_at.map_or(true, |(t, _)| t > at) {
            w.kill_at = Some((at, Signal::KILL));
        }
        self.arm_tick(at);
    }

    fn on_signal(&mut self) -> Result<()> {
        let mut buf = [0u8; 128 * 8];
        let mut chld = false;
        loop {
            let Some(fd) = self.sigfd.as_ref() else {
                return Ok(());
            };
            match rustix::io::read(fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for info in buf[..n].chunks_exact(128) {
                        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
                        match signo {
                            libc::SIGCHLD => chld = true,
                            libc::SIGTERM | libc::SIGQUIT => self.stop(true),
                            libc::SIGINT => self.stop(false),
                            libc::SIGHUP => self.restart(),
                            libc::SIGTTIN => {
                                let n = self.desired + 1;
                                let _ = self.scale(n);
                            }
                            libc::SIGTTOU => {
                                let n = self.desired.saturating_sub(1).max(1);
                                let _ = self.scale(n);
                            }
                            _ => {}
                        }
                    }
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => return Err(Error::os("read(signalfd)", e)),
            }
        }
        if chld {
            self.reap();
        }
        Ok(())
    }

    /// Reaps our workers only (`waitpid(pid, WNOHANG)` per worker: never `waitpid(-1)`, which
    /// would steal the exit status of the application's other children).
    fn reap(&mut self) {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            let Some(w) = self.slots[slot].w.as_mut() else {
                continue;
            };
            if w.status.is_some() {
                continue;
            }
            let r = loop {
                match rustix::process::waitpid(Some(w.pid), WaitOptions::NOHANG) {
                    Err(Errno::INTR) => continue,
                    other => break other,
                }
            };
            match r {
                Ok(Some((_, st))) => {
                    w.status = Some(raw_status(st));
                    w.reaped_at = Some(now);
                    self.after_reap(slot, now);
                }
                Ok(None) => {}
                Err(_) => {
                    // ECHILD: not our child any more (reaped elsewhere). Report it as killed.
                    w.status = Some(libc::SIGKILL);
                    w.reaped_at = Some(now);
                    self.after_reap(slot, now);
                }
            }
        }
        let _ = self.manage(now);
    }

    /// A worker was reaped: take back the connections it never received; once everything it
    /// sent was read (its channel reports end of file, now that the primary's duplicate of the
    /// worker's end is closed) it is finished. A channel kept open by a grandchild that
    /// inherited it is closed after a second.
    fn after_reap(&mut self, slot: usize, now: Instant) {
        self.recover(slot);
        match self.slots[slot].w.as_ref() {
            Some(w) if w.chan.is_none() => self.finish(slot),
            Some(_) => self.arm_tick(now + Duration::from_secs(1)),
            None => {}
        }
        self.drain_pending();
    }

    /// The worker's channel is closed and it was reaped: report `Exit`, free the slot, respawn.
    fn finish(&mut self, slot: usize) {
        self.recover(slot);
        let s = &mut self.slots[slot];
        let Some(w) = s.w.take() else { return };
        s.gen = s.gen.wrapping_add(1);
        self.alive -= 1;
        let raw = w.status.unwrap_or(0);
        let pid = w.pid.as_raw_nonzero().get() as u32;
        self.events
            .push(Ev::Exit(w.id, pid, raw, w.after_disconnect));
        if let Some((old, restart)) = w.replaces {
            // A replacement died before it was ready: the old worker stays and is tried again.
            if let Some(old_slot) = self.find(old) {
                if let Some(o) = self.slots[old_slot].w.as_mut() {
                    o.replaced = false;
                }
                if restart {
                    self.restart_active = self.restart_active.saturating_sub(1);
                    self.restart_queue.push_front(old);
                }
            }
        }
        if self.run != Run::Running {
            return;
        }
        let now = Instant::now();
        let status = ExitStatus::from_raw(raw);
        if !w.after_disconnect {
            if self.settings.sup.fatal_exit_code.is_some()
                && status.code() == self.settings.sup.fatal_exit_code
            {
                self.events
                    .push(Ev::Fatal(w.id, status.code().unwrap_or(0)));
                self.desired = self.desired.saturating_sub(1);
            } else if self.settings.sup.respawn {
                let healthy = self.settings.sup.healthy_uptime;
                let young = now.saturating_duration_since(w.started) < healthy;
                if young && w.ready {
                    // It was serving when it died (killed from outside, or a crash while
                    // handling work): not a start-up crash loop. Respawn after the minimum delay
                    // only, which still bounds forks to one per `backoff_min`.
                    let delay = self.settings.sup.backoff_min;
                    let at = now + delay;
                    if self.respawn_at.map_or(true, |t| t < at) {
                        self.respawn_at = Some(at);
                    }
                    self.events.push(Ev::Backoff(delay));
                    self.arm_tick(at);
                } else if young {
                    // A worker forked after the last crash has stayed up for the healthy
                    // uptime: that crash loop is over, this crash starts a new streak.
                    let over = self.last_crash.is_some_and(|t| {
                        self.slots.iter().filter_map(|s| s.w.as_ref()).any(|o| {
                            o.started > t
                                && o.status.is_none()
                                && now.saturating_duration_since(o.started) >= healthy
                        })
                    });
                    if over {
                        self.crash_streak = 0;
                    }
                    self.last_crash = Some(now);
                    self.crash_streak = self.crash_streak.saturating_add(1);
                    let min = self.settings.sup.backoff_min;
                    let shift = (self.crash_streak - 1).min(16);
                    let delay = min
                        .saturating_mul(1 << shift)
                        .min(self.settings.sup.backoff_max);
                    let at = now + delay;
                    if self.respawn_at.map_or(true, |t| t < at) {
                        self.respawn_at = Some(at);
                    }
                    self.events.push(Ev::Backoff(delay));
                    self.arm_tick(at);
                } else {
                    self.crash_streak = 0;
                }
            }
        }
        self.step_restart();
        let _ = self.manage(now);
    }

    /// Forks workers until as many are active as wanted (respawn), unless backing off.
    fn manage(&mut self, now: Instant) -> Result<()> {
        if self.run != Run::Running || !self.settings.sup.respawn {
            return Ok(());
        }
        if let Some(t) = self.respawn_at {
            if t > now {
                return Ok(());
            }
            self.respawn_at = None;
        }
        while self.active() < self.desired {
            self.spawn(&[], None)?;
        }
        Ok(())
    }

    fn step_restart(&mut self) {
        if self.run != Run::Running {
            return;
        }
        while self.restart_active < self.settings.sup.restart_batch {
            let Some(old) = self.restart_queue.pop_front() else {
                break;
            };
            let Some(slot) = self.find(old) else { continue };
            if self.slots[slot]
                .w
                .as_ref()
                .map_or(true, |w| w.after_disconnect || w.replaced)
            {
                continue;
            }
            if let Some(w) = self.slots[slot].w.as_mut() {
                w.replaced = true;
            }
            match self.spawn(&[], Some((old, true))) {
                Ok(_) => self.restart_active += 1,
                Err(_) => {
                    if let Some(w) = self.slots[slot].w.as_mut() {
                        w.replaced = false;
                    }
                    self.restart_queue.push_front(old);
                    break;
                }
            }
        }
    }

    /// A worker is ready to serve (listening, or online without listeners): if it replaces
    /// another, that one now leaves.
    fn replacement_ready(&mut self, slot: usize) {
        let Some(w) = self.slots[slot].w.as_mut() else {
            return;
        };
        let Some((old, restart)) = w.replaces.take() else {
            return;
        };
        let new = w.id;
        if let Some(old_slot) = self.find(old) {
            self.disconnect_slot(old_slot, self.settings.sup.graceful_timeout);
        }
        if restart {
            self.restart_active = self.restart_active.saturating_sub(1);
            self.events
                .push(Ev::Restart(old, new, self.restart_queue.len()));
            self.step_restart();
            if self.restart_active == 0 && self.restart_queue.is_empty() {
                self.events.push(Ev::RestartDone);
            }
        }
    }

    /// Max requests reached: fork a replacement; this one leaves once it is listening.
    fn recycle(&mut self, slot: usize) {
        let Some(w) = self.slots[slot].w.as_mut() else {
            return;
        };
        if w.replaced || w.after_disconnect || self.run != Run::Running {
            return;
        }
        w.replaced = true;
        let id = w.id;
        self.events.push(Ev::Recycle(id));
        if self.spawn(&[], Some((id, false))).is_err() {
            if let Some(w) = self.slots[slot].w.as_mut() {
                w.replaced = false;
            }
        }
    }

    fn on_tick(&mut self, now: Instant) -> Result<()> {
        if self.rearm_at.is_some_and(|t| t <= now) {
            self.rearm_at = None;
            self.rearm();
        }
        let hang = self.settings.sup.hang_timeout;
        let max_shared =
            self.settings.sup.max_requests.is_some() && self.settings.schedule == Schedule::Shared;
        for slot in 0..self.slots.len() {
            let base = slot * SLOT_WORDS;
            let beat = self.shm.slots()[base + W_BEAT].load(Ordering::Relaxed);
            let conns = self.shm.slots()[base + W_CONNS].load(Ordering::Relaxed);
            let mut hung = None;
            let mut recycle = false;
            let mut force_close = false;
            {
                let Some(w) = self.slots[slot].w.as_mut() else {
                    continue;
                };
                if let Some((t, sig)) = w.kill_at {
                    if t <= now {
                        let _ = w.signal(sig);
                        w.kill_at = if sig == Signal::KILL {
                            None
                        } else {
                            Some((now + Duration::from_secs(1), Signal::KILL))
                        };
                    }
                }
                if w.reaped_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
                {
                    force_close = w.chan.is_some();
                }
                if beat != w.beat {
                    w.beat = beat;
                    w.beat_seen = now;
                } else if let Some(limit) = hang {
                    let busy = beat & 1 == 0;
                    if busy
                        && !w.hung
                        && w.status.is_none()
                        && now.saturating_duration_since(w.beat_seen) > limit
                    {
                        w.hung = true;
                        hung = Some(w.id);
                        let _ = w.signal(Signal::ABORT);
                        w.kill_at = Some((now + Duration::from_secs(1), Signal::KILL));
                    }
                }
                if max_shared && conns >= w.max_conns && !w.replaced && !w.after_disconnect {
                    recycle = true;
                }
            }
            if let Some(id) = hung {
                self.events.push(Ev::Hung(id));
                // No more work for it; what it holds is recovered when it is reaped.
                self.unready(slot);
            }
            if recycle {
                self.recycle(slot);
            }
            if force_close {
                self.channel_closed(slot);
            }
        }
        self.manage(now)?;
        self.drain_pending();
        self.schedule_tick(now);
        Ok(())
    }

    fn jitter(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (max + 1)
    }

    /// Forks one worker into a free slot.
    fn spawn(&mut self, env: &[(&str, &str)], replaces: Option<(u32, bool)>) -> Result<u32> {
        let slot = match self.slots.iter().position(|s| s.w.is_none()) {
            Some(i) => i,
            None if self.slots.len() < self.settings.max_workers => {
                self.slots.push(Slot { gen: 0, w: None });
                self.slots.len() - 1
            }
            None => return Err(Error::Capacity("worker table full")),
        };
        let (mine, theirs) = Channel::pair()?;
        // The in-flight bound: the kernel charges each queued frame to the sender's buffer
        // until the worker reads it, so a small send buffer caps the queue (about
        // `max_in_flight` connection frames), and a stuck worker stops getting work.
        rustix::net::sockopt::set_socket_send_buffer_size(
            &mine,
            self.settings.in_flight * SNDBUF_PER_FRAME,
        )
        .call("setsockopt(SO_SNDBUF)")?;
        let theirs_dup = Channel::from_fd(
            theirs
                .as_fd()
                .try_clone_to_owned()
                .call("fcntl(F_DUPFD_CLOEXEC)")?,
        );
        let id = self.next_id;
        let base = slot * SLOT_WORDS;
        for k in 0..SLOT_WORDS {
            self.shm.slots()[base + k].store(0, Ordering::Relaxed);
        }
        let max_conns = match self.settings.sup.max_requests {
            Some((n, j)) => n + self.jitter(j),
            None => u64::MAX,
        };
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        match sys::fork()? {
            Forked::Child => {
                drop(mine);
                // The primary's duplicate of this worker's end is not the worker's to hold.
                drop(theirs_dup);
                self.become_worker(theirs, id, slot, env)
            }
            Forked::Parent(pid) => {
                drop(theirs);
                self.next_id += 1;
                let gen = self.slots[slot].gen;
                let Some(ep) = &self.epoll else {
                    return Err(Error::Invalid("primary state used in a worker"));
                };
                epoll::add(ep, &mine, worker_token(slot, gen), epoll::EventFlags::IN)
                    .call("epoll_ctl")?;
                let now = Instant::now();
                self.slots[slot].w = Some(W {
                    id,
                    pid,
                    chan: Some(mine),
                    state: State::Forked,
                    peer: Some(theirs_dup),
                    in_ready: false,
                    ready: false,
                    blocked: false,
                    disconnect_pending: false,
                    after_disconnect: false,
                    started: now,
                    kill_at: None,
                    status: None,
                    reaped_at: None,
                    replaces,
                    replaced: false,
                    dispatched: 0,
                    max_conns,
                    beat: 0,
                    beat_seen: now,
                    hung: false,
                });
                self.alive += 1;
                self.events
                    .push(Ev::Fork(id, pid.as_raw_nonzero().get() as u32));
                Ok(id)
            }
        }
    }

    /// In the child, right after fork: keep only this worker's fds, reset signals, run the
    /// worker function, exit.
    fn become_worker(&mut self, chan: Channel, id: u32, slot: usize, env: &[(&str, &str)]) -> ! {
        // Die with the primary; if it is already gone, do not start.
        let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
        if rustix::process::getppid() != Some(self.me) {
            sys::exit_now(1);
        }
        sys::reset_child_signals(&self.ignored);
        // Close what belongs to the primary: its epoll and signal fds, every other worker's
        // channel and unacknowledged connections, queued connections, and (round-robin) the
        // listeners.
        self.sigfd = None;
        for s in self.slots.iter_mut() {
            if let Some(w) = s.w.as_mut() {
                w.chan = None;
                w.peer = None;
            }
        }
        self.pending.clear();
        let shared = self.settings.schedule == Schedule::Shared;
        let listeners = core::mem::take(&mut self.listeners)
            .into_iter()
            .map(|l| {
                let Listener {
                    fd,
                    family,
                    addr,
                    unlink: _,
                } = l;
                (if shared { Some(fd) } else { None }, family, addr)
            })
            .collect::<Vec<(Option<OwnedFd>, Family, ListenAddr)>>();
        self.epoll = None;
        for (k, v) in self.settings.env.iter() {
            std::env::set_var(k, v);
        }
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let init = WorkerInit {
            id,
            chan,
            listeners,
            schedule: self.settings.schedule,
            nonblocking: self.settings.nonblocking,
            shm: self.shm.clone(),
            slot,
        };
        // A panic stops here, as in a `main` that panics (exit code 101): unwinding further
        // would run the primary's stack frames, copied by fork, in this worker, and dropping
        // its copy of the `Primary` would kill the worker's siblings.
        let worker_fn = &mut self.worker_fn;
        let code = match Worker::new(init) {
            Ok(w) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker_fn(w)))
                .unwrap_or(101),
            Err(_) => 1,
        };
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        sys::exit_now(code)
    }
}

/// The epoll token of a worker's channel: its slot, and the slot's generation so that an event
/// for a worker that is gone never reaches the slot's next worker.
fn worker_token(slot: usize, gen: u32) -> epoll::EventData {
    epoll::EventData::new_u64(TAG_WORKER | (gen as u64) << 24 | slot as u64)
}

/// Watches a worker's channel for readability, and for writability while its queue is full.
fn watch(ep: Option<&OwnedFd>, chan: &Channel, slot: usize, gen: u32, writable: bool) {
    let flags = if writable {
        epoll::EventFlags::IN | epoll::EventFlags::OUT
    } else {
        epoll::EventFlags::IN
    };
    if let Some(ep) = ep {
        let _ = epoll::modify(ep, chan, worker_token(slot, gen), flags);
    }
}

fn raw_status(st: rustix::process::WaitStatus) -> i32 {
    if let Some(code) = st.exit_status() {
        (code & 0xff) << 8
    } else if let Some(sig) = st.terminating_signal() {
        sig & 0x7f
    } else {
        0
    }
}

impl AsFd for Primary {
    /// The primary's epoll fd: readable when [`Primary::next_event`] has something to do, for
    /// an application that waits on it in its own poll loop.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.epoll {
            Some(ep) => ep.as_fd(),
            // Only in a forked worker, which never returns to primary code.
            None => rustix::stdio::stdin(),
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        // No orphans, no zombies: whatever is still alive is killed and reaped.
        for s in self.slots.iter_mut() {
            if let Some(w) = s.w.take() {
                if w.status.is_none() {
                    let _ = rustix::process::kill_process(w.pid, Signal::KILL);
                    let _ = rustix::process::waitpid(Some(w.pid), WaitOptions::empty());
                }
            }
        }
        for l in &self.listeners {
            if let Some(p) = &l.unlink {
                let _ = std::fs::remove_file(p);
            }
        }
        self.sigfd = None;
        self.sigset.restore();
    }
}

impl core::fmt::Debug for Primary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Primary")
            .field("workers", &self.alive)
            .field("wanted", &self.desired)
            .field("schedule", &self.settings.schedule)
            .finish_non_exhaustive()
    }
}
