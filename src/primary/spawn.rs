//! Forking one worker: its channel (with the in-flight bound and the primary's duplicate of
//! the worker's end), its counters, the fork, and in the child everything between `fork` and
//! the worker function: die with the primary, reset signals, keep only the worker's own fds,
//! then name, pin and (when asked) drop privileges (`deploy`).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use rustix::event::epoll;
use rustix::process::Signal;

use super::events::Ev;
use super::supervisor::Replace;
use super::table::{worker_token, State, W};
use super::Primary;
use crate::channel::Channel;
use crate::error::{Call, Error, Result};
use crate::listener::{Family, ListenAddr, Listener};
use crate::sys::{self, Forked};
use crate::worker::{Worker, WorkerInit};

/// Send-buffer bytes per connection frame of the in-flight bound: the kernel doubles the value
/// set and charges a queued 18-byte frame with one fd about 745 bytes (measured: a doubled
/// buffer of 8192 holds 11 such frames). The kernel's floor (4608) holds 6.
const SNDBUF_PER_FRAME: usize = 376;

impl Primary {
    /// Forks one worker into a free slot and tells the supervisor (`asked`: the supervisor
    /// asked for this fork).
    pub(super) fn spawn(
        &mut self,
        env: &[(&str, &str)],
        replaces: Option<Replace>,
        asked: bool,
    ) -> Result<u32> {
        let (slot, gen) = self
            .table
            .free_slot()
            .ok_or(Error::Capacity("worker table full"))?;
        // Its seat: the one of the worker it replaces, else the lowest vacant one; a seat
        // without sockets gets them now (reuseport), so a failure here is a failed spawn.
        let share = replaces.and_then(|r| self.table.get(r.slot).map(|w| w.seat));
        let (seat, make) = self.seats.pick(share);
        if make {
            self.open_seat(seat)?;
        }
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
        let id = self.table.next_id();
        // An exec'd worker: everything the child needs, made here (it must not allocate).
        let mut seat_fds: arrayvec::ArrayVec<Option<std::os::fd::RawFd>, 16> =
            arrayvec::ArrayVec::new();
        for li in 0..self.seats.nl {
            seat_fds.push(self.seats.sock(seat, li).map(|f| f.as_raw_fd()));
        }
        let plan = self.settings.exec.as_ref().map(|spec| {
            (spec.plan)(
                spec,
                &crate::settings::PlanInput {
                    id,
                    max_open: self.settings.max_open,
                    seat,
                    seat_fds: &seat_fds,
                    schedule: self.settings.schedule,
                    nonblocking: self.settings.nonblocking,
                    app_accepts: self.settings.app_accepts,
                    chan: theirs.as_fd().as_raw_fd(),
                    listeners: &self.dispatch.listeners,
                    env,
                    cluster_env: &self.settings.env,
                },
            )
        });
        self.board.clear(slot);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        match sys::fork()? {
            Forked::Child => {
                // An exec'd worker: the setup and the exec, without allocating (`exec`).
                if let (Some(plan), Some(spec)) = (&plan, &self.settings.exec) {
                    plan.exec(
                        spec,
                        &crate::settings::ChildSetup {
                            id,
                            slot,
                            primary: self.me,
                            ignored: &self.ignored,
                            deploy: &self.settings.deploy,
                        },
                    )
                }
                drop(mine);
                // The primary's duplicate of this worker's end is not the worker's to hold.
                drop(theirs_dup);
                self.become_worker(theirs, id, slot, seat, env)
            }
            Forked::Parent(pid) => {
                drop(theirs);
                drop(plan);
                let max_conns = self.sup.forked(slot, id, Instant::now(), replaces, asked);
                // From here on the child is in the table, whatever fails: it is reaped and
                // its exit reported like any other.
                let watched = match &self.epoll {
                    Some(ep) => {
                        epoll::add(ep, &mine, worker_token(slot, gen), epoll::EventFlags::IN)
                            .is_ok()
                    }
                    None => false,
                };
                self.table.insert(
                    slot,
                    W {
                        id,
                        pid,
                        chan: Some(mine).filter(|_| watched),
                        state: State::Forked,
                        peer: Some(theirs_dup),
                        in_ready: false,
                        ready_stamp: 0,
                        blocked: false,
                        disconnect_pending: false,
                        leaving: false,
                        status: None,
                        dispatched: 0,
                        max_conns,
                        announced: 0,
                        closed_itself: false,
                        seat,
                        sitting: true,
                        held_back: false,
                    },
                );
                if self.seats.sit(seat, slot, gen) {
                    self.unpoll_seat(seat);
                }
                self.alive += 1;
                self.events
                    .push(Ev::Fork(id, pid.as_raw_nonzero().get() as u32));
                if !watched {
                    // A worker the loop cannot hear from is of no use: it goes, and the
                    // supervisor sees a crash.
                    if let Some(w) = self.table.get(slot) {
                        let _ = w.signal(Signal::KILL);
                    }
                    self.sup.channel_closed(slot, Instant::now());
                }
                Ok(id)
            }
        }
    }

    /// In the child, right after fork: keep only this worker's fds, reset signals, run the
    /// worker function, exit.
    fn become_worker(
        &mut self,
        chan: Channel,
        id: u32,
        slot: usize,
        seat: u32,
        env: &[(&str, &str)],
    ) -> ! {
        // Die with the primary; if it is already gone, do not start.
        let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
        if rustix::process::getppid() != Some(self.me) {
            sys::exit_now(1);
        }
        sys::reset_child_signals(&self.ignored);
        // Close what belongs to the primary: its epoll and signal fds, every other worker's
        // channel and unacknowledged connections, queued connections, and (round-robin) the
        // stream listeners.
        self.sigfd = None;
        // The notify socket is the primary's.
        self.sd = None;
        // Only this worker's counters stay mapped: it cannot write its siblings' heartbeats.
        self.board.keep_only(slot);
        for (_, w) in self.table.iter_mut() {
            w.chan = None;
            w.peer = None;
        }
        self.dispatch.pending.clear();
        self.dispatch.orphans.clear();
        self.dispatch.reserve = None;
        let shared = self.settings.schedule.workers_accept();
        // Reuseport: this seat's sockets; every other seat's are closed.
        let mut own = self.seats.keep_only(seat).into_iter();
        let listeners = core::mem::take(&mut self.dispatch.listeners)
            .into_iter()
            .map(|l| {
                let Listener {
                    fd,
                    family,
                    addr,
                    unlink: _,
                } = l;
                let fd = match own.next().flatten() {
                    Some(seat_fd) => Some(seat_fd),
                    // Datagrams are not handed off: every worker holds the UDP sockets, in
                    // every schedule (under reuseport, its seat's own, above); the stream
                    // listeners only where the workers accept.
                    None => fd.filter(|_| shared || family == Family::Udp),
                };
                (fd, family, addr)
            })
            .collect::<Vec<(Option<OwnedFd>, Family, ListenAddr)>>();
        self.epoll = None;
        // Name, CPU, and the privilege drop (verified; a failed drop exits here): before any
        // application code, and before the environment and the worker handle are made.
        self.settings.deploy.enter(id, slot, self.me);
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
            max_open: self.settings.max_open,
            app_accepts: self.settings.app_accepts,
            board: self.board.clone(),
            slot,
            seat,
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
