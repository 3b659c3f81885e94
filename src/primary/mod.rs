//! The primary: the [`Primary`] handle and its loop. The loop waits on one epoll set (the
//! listeners, every worker's channel, the signalfd), routes each ready fd to its room, and
//! carries out what the supervisor decides. It holds no policy of its own.
//!
//! | room | concern |
//! |---|---|
//! | `api` | the public controls: send, kill, disconnect, stop, restart, scale, the table |
//! | `table` | worker slots, ids, generations, epoll tokens, lookup by id and pid |
//! | `dispatch` | accept, pending queue, hand-off, in-flight bound, recovery |
//! | `choose` | least connections, sticky, the connection limit, connections handed back |
//! | `seats` | workers' seats: reuseport sockets (made, polled, drained, closed), sticky's score |
//! | `schedule` | which ready worker gets the next connection |
//! | `protocol` | frames from workers: judge, account, turn into events |
//! | `lifecycle` | signals, reaping, channel close, `Disconnect`, `Exit` |
//! | `spawn` | forking one worker, and the child's side up to the worker function |
//! | `supervisor` | the policy, as a state machine with no system calls |
//! | `events` | [`Event`], [`ClusterStats`], the event queue |

mod api;
mod choose;
mod dispatch;
mod events;
mod lifecycle;
mod protocol;
mod schedule;
mod seats;
mod spawn;
mod supervisor;
mod table;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

use arrayvec::ArrayVec;
use rustix::event::epoll;
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

use crate::channel::RecvBuf;
use crate::error::{Call, Error, Result};
use crate::heartbeat::{Board, FOLD_EVERY};
use crate::listener::{self, Listener};
use crate::settings::{Schedule, Settings};
use crate::sys::{self, SignalSet};
use crate::systemd::Lifecycle;
use crate::worker::WorkerFn;

pub use events::{ClusterStats, Event};
pub use table::{State, WorkerInfo};

use dispatch::Dispatch;
use events::Events;
use supervisor::{Action, Probe, Supervisor, TICK};
use table::{Table, TAG_LISTENER, TAG_MASK, TAG_SEAT, TAG_SIGNAL, TAG_WORKER};

const EPOLL_EVENTS: usize = 64;
/// Shared schedule: how often the primary checks that the shared listeners still listen.
const LISTENER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The largest worker table. The slot field of a worker's epoll token has 24 bits, but the
/// tables are made in full at start (about 200 bytes and one page of address space per slot),
/// so the limit is lower.
pub(crate) const MAX_WORKERS: usize = 1 << 16;

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
    settings: Settings,
    table: Table,
    dispatch: Dispatch,
    seats: seats::Seats,
    sup: Supervisor,
    events: Events,
    evbuf: Box<[epoll::Event; EPOLL_EVENTS]>,
    ev_pos: usize,
    ev_len: usize,
    rbuf: Box<RecvBuf>,
    worker_fn: WorkerFn,
    board: Rc<Board>,
    /// Workers forked and not yet reported by `Exit`.
    alive: usize,
    tick_at: Option<Instant>,
    seq: u32,
    /// Frames read from the current ready channel in this round (fairness: see `protocol`).
    frames: usize,
    /// The loop steps back to the current ready fd next time.
    again: bool,
    /// PID 1 or a child subreaper: children that are not workers are reaped too.
    reap_orphans: bool,
    /// SIGCHLD was ignored when the cluster started (restored on drop).
    chld_was_ignored: bool,
    /// systemd's notifications, when `NOTIFY_SOCKET` was set.
    sd: Option<Lifecycle>,
    /// A rolling restart was under way at the last `apply` (for `RELOADING=1`/`READY=1`).
    was_restarting: bool,
    /// The wanted workers at the last `apply` (fewer now: empty reuseport seats may go).
    was_wanted: usize,
}

impl Primary {
    pub(crate) fn start(
        settings: Settings,
        mut listeners: Vec<Listener>,
        n: usize,
        worker_fn: WorkerFn,
        sd: Option<Lifecycle>,
    ) -> Result<Primary> {
        // What can fail without side effects comes first; a failure removes the socket files
        // this start created.
        let max = settings.max_workers;
        let made = epoll::create(epoll::CreateFlags::CLOEXEC)
            .call("epoll_create1")
            .and_then(|ep| Ok((ep, Board::new(max)?)));
        let (epoll, board) = match made {
            Ok(m) => m,
            Err(e) => {
                listener::unlink_all(&mut listeners);
                return Err(e);
            }
        };
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
        let me = rustix::process::getpid();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (me.as_raw_nonzero().get() as u64) << 32;
        let sup = Supervisor::new(
            settings.sup.clone(),
            settings.schedule.workers_accept(),
            n,
            max,
            seed,
        );
        // From here on, whatever fails drops the `Primary`, which restores the signal mask and
        // SIGCHLD's disposition, removes the socket files and kills what was forked.
        let stream_listeners: ArrayVec<bool, 16> = listeners
            .iter()
            .take(16)
            .map(|l| l.family != crate::listener::Family::Udp)
            .collect();
        let mut p = Primary {
            epoll: Some(epoll),
            sigfd: None,
            sigset: SignalSet::new(&sigs),
            ignored,
            me,
            table: Table::new(max),
            dispatch: Dispatch::new(
                listeners,
                max,
                settings.in_flight,
                settings.nonblocking,
                settings.backlog,
                settings.schedule,
                seed,
            ),
            seats: seats::Seats::new(
                max,
                if settings.schedule == Schedule::ReusePort {
                    &stream_listeners
                } else {
                    &[]
                },
            ),
            sup,
            events: Events::with_capacity(8 * max + 64),
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
            board: Rc::new(board),
            alive: 0,
            tick_at: None,
            seq: 0,
            frames: 0,
            again: false,
            reap_orphans: me.as_raw_nonzero().get() == 1
                || rustix::process::child_subreaper().is_ok_and(|p| p.is_some()),
            chld_was_ignored: false,
            sd,
            was_restarting: false,
            was_wanted: n,
            settings,
        };
        // With SIGCHLD ignored the kernel reaps children itself and no exit would be seen:
        // the default disposition while the primary runs, the old one back when it is dropped.
        p.chld_was_ignored = sys::set_default(libc::SIGCHLD);
        let sigfd = p.sigset.block_and_open()?;
        let ep = p.epoll.as_ref().ok_or(Error::Invalid("no epoll"))?;
        epoll::add(
            ep,
            &sigfd,
            epoll::EventData::new_u64(TAG_SIGNAL),
            epoll::EventFlags::IN,
        )
        .call("epoll_ctl")?;
        p.sigfd = Some(sigfd);
        if p.settings.schedule.hands_off() {
            for (i, l) in p.dispatch.listeners.iter().enumerate() {
                // A UDP socket is the workers' to read: the primary never does.
                let Some(fd) = l.fd.as_ref().filter(|_| l.family.accepts()) else {
                    continue;
                };
                epoll::add(
                    ep,
                    fd,
                    epoll::EventData::new_u64(TAG_LISTENER | i as u64),
                    epoll::EventFlags::IN,
                )
                .call("epoll_ctl")?;
            }
        }
        p.dispatch.reserve = p.make_reserve();
        p.set_max_open(p.settings.max_open);
        for _ in 0..n {
            p.spawn(&[], None, false)?;
        }
        p.schedule_tick(Instant::now());
        Ok(p)
    }

    /// The loop: queued events first, then the ready fds of the last `epoll_wait`, then ticks,
    /// then a new `epoll_wait` until the next tick or the caller's deadline.
    fn wait(&mut self, deadline: Option<Instant>) -> Result<Option<Event<'_>>> {
        loop {
            while let Some((slot, gen, e)) = self.dispatch.broken.pop() {
                if self.table.get_gen(slot, gen).is_some() {
                    self.worker_error(slot, e);
                }
            }
            if !self.dispatch.due.is_empty() {
                let mut due = core::mem::take(&mut self.dispatch.due);
                for slot in due.drain(..) {
                    self.sup.recycle(slot);
                }
                self.dispatch.due = due;
                self.apply();
            }
            if let Some(ev) = self.events.queue.pop_front() {
                if self.sd.is_some() {
                    self.notify_workers();
                }
                return Ok(Some(ev.public(&self.dispatch.listeners)));
            }
            if !self.sup.running() && self.alive == 0 {
                return Ok(None);
            }
            if self.ev_pos < self.ev_len {
                let e = self.evbuf[self.ev_pos];
                self.ev_pos += 1;
                // A new ready fd gets a new frame budget; a channel the loop came back to
                // (after returning a message or an event) goes on with what it had left.
                if !core::mem::take(&mut self.again) {
                    self.frames = 0;
                }
                let data = e.data.u64();
                let flags = { e.flags };
                match data & TAG_MASK {
                    TAG_LISTENER => self.on_listener((data & 0xffff) as usize),
                    TAG_SEAT => {
                        self.on_seat(((data >> 8) & 0xff_ffff) as u32, (data & 0xff) as usize)
                    }
                    TAG_SIGNAL => self.on_signal()?,
                    TAG_WORKER => {
                        let (slot, gen) = table::worker_of(data);
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
            if let Some(sd) = self.sd.as_mut() {
                sd.tick(now);
            }
            if self.tick_at.is_some_and(|t| t <= now) {
                self.on_tick(now);
                continue;
            }
            if deadline.is_some_and(|d| d <= now) {
                return Ok(Some(Event::Idle));
            }
            let until = [
                self.tick_at,
                deadline,
                self.sd.as_ref().and_then(|s| s.deadline()),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = until.map(|t| {
                let d = t.saturating_duration_since(now);
                rustix::time::Timespec {
                    tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
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

    /// Carries out what the supervisor decided, in order.
    fn apply(&mut self) {
        while let Some(a) = self.sup.next_action() {
            match a {
                Action::Fork { replaces } => {
                    if let Err(e) = self.spawn(&[], replaces, true) {
                        self.sup.fork_failed(replaces, e, Instant::now());
                    }
                }
                Action::Signal { slot, sig } => {
                    if let Some(w) = self.table.get(slot) {
                        let _ = w.signal(sig);
                    }
                }
                Action::Disconnect { slot } => self.send_disconnect(slot),
                Action::Retire { slot } => self.retire(slot),
                Action::Unready { slot } => self.unready(slot),
                Action::CloseChannel { slot } => self.channel_closed(slot),
                Action::StopAccepting => self.close_listeners(),
                Action::Event(ev) => self.events.push(ev),
                Action::Wake(at) => self.arm_tick(at),
            }
        }
        let wanted = self.sup.desired();
        if wanted < self.was_wanted {
            self.trim_seats();
        }
        self.was_wanted = wanted;
        if let Some(sd) = self.sd.as_mut() {
            let restarting = self.sup.restarting();
            if restarting && !self.was_restarting {
                sd.reloading();
            } else if !restarting && self.was_restarting {
                sd.reloaded();
            }
            self.was_restarting = restarting;
            if !self.sup.running() {
                sd.stopping();
            }
        }
    }

    /// `STATUS=` (workers taking connections, workers wanted) when it changed, and `READY=1`
    /// once they all do (after start and after a rolling restart). At lifecycle events only.
    fn notify_workers(&mut self) {
        let none = self.dispatch.listeners.is_empty();
        let serving = self
            .table
            .iter()
            .filter(|(_, w)| {
                !w.leaving
                    && (w.state == State::Listening
                        || (none && w.announced & protocol::SAID_LOOPING != 0))
            })
            .count();
        let wanted = self.sup.desired();
        if let Some(sd) = self.sd.as_mut() {
            sd.workers(serving, wanted);
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.dispatch.rearm_at.is_some_and(|t| t <= now) {
            self.dispatch.rearm_at = None;
            self.rearm();
        }
        let (board, table) = (&self.board, &self.table);
        let watch_queues = self.settings.sup.hang_timeout.is_some();
        self.sup.tick(now, |slot| Probe {
            beat: board.beat(slot),
            conns: board.conns(slot),
            queued: watch_queues
                && table
                    .get(slot)
                    .and_then(|w| w.peer.as_ref())
                    .is_some_and(|p| rustix::io::ioctl_fionread(p).is_ok_and(|n| n > 0)),
        });
        self.apply();
        self.board.fold_all(self.table.len());
        self.check_listeners();
        self.check_seats();
        self.recheck_full();
        self.drain_orphans();
        self.drain_pending();
        self.schedule_tick(now);
    }

    fn arm_tick(&mut self, at: Instant) {
        self.tick_at = Some(self.tick_at.map_or(at, |t| t.min(at)));
    }

    fn schedule_tick(&mut self, now: Instant) {
        let periodic = self.sup.needs_tick()
            || !self.dispatch.full.is_empty()
            || self.dispatch.rearm_at.is_some()
            || !self.dispatch.orphans.is_empty();
        // The workers' 32-bit counters are folded into 64-bit totals at every tick, and ticks
        // come at least every FOLD_EVERY.
        let every = if periodic {
            TICK
        } else if self.settings.schedule.workers_accept() {
            LISTENER_CHECK
        } else {
            FOLD_EVERY
        };
        self.tick_at = Some(now + every);
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
        // No orphans, no zombies: whatever is still alive is killed and reaped, waiting two
        // seconds at most (a process in uninterruptible sleep dies when it wakes; it is left
        // to init then).
        for (_, w) in self.table.iter() {
            if w.status.is_none() {
                let _ = rustix::process::kill_process(w.pid, Signal::KILL);
            }
        }
        let until = Instant::now() + std::time::Duration::from_secs(2);
        for (_, w) in self.table.iter() {
            while w.status.is_none() {
                match rustix::process::waitpid(Some(w.pid), WaitOptions::NOHANG) {
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(Errno::INTR) => {}
                    _ => break,
                }
            }
        }
        listener::unlink_all(&mut self.dispatch.listeners);
        self.sigfd = None;
        self.sigset.restore();
        if self.chld_was_ignored {
            sys::ignore(libc::SIGCHLD);
        }
    }
}

impl core::fmt::Debug for Primary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Primary")
            .field("workers", &self.alive)
            .field("wanted", &self.sup.desired())
            .field("schedule", &self.settings.schedule)
            .finish_non_exhaustive()
    }
}
