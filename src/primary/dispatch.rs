//! Round-robin dispatch: accept, the pending queue, the hand-off of each connection to the
//! worker the schedule picks, the in-flight bound, and the recovery of what a dead worker left
//! queued.
//!
//! Per connection the primary makes exactly `accept4`, `sendmsg` and `close`: its copy of the
//! connection is closed as soon as the frame is queued, because the connection now lives in the
//! worker's channel queue, which the primary can still read back if the worker dies first.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::events::Ev;
use super::schedule::Ready;
use super::table::{watch, State, TAG_LISTENER};
use super::Primary;
use crate::error::Error;
use crate::frame::{Frame, Kind};
use crate::listener::Listener;
use crate::settings::Schedule;

/// Accepted connections the primary queues while no worker can take one; past this it stops
/// accepting and lets the kernel's backlog hold the rest.
pub(crate) const PENDING_MAX: usize = 1024;
/// Connections accepted per listener wakeup before the loop looks at other fds.
const ACCEPT_BUDGET: usize = 64;
/// How long accepting pauses after `EMFILE` and the like.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The state of dispatch.
pub(crate) struct Dispatch {
    pub(crate) listeners: Vec<Listener>,
    /// The listeners are in epoll.
    armed: bool,
    /// When a pause in accepting ends.
    pub(crate) rearm_at: Option<Instant>,
    pub(crate) pending: VecDeque<(OwnedFd, u16)>,
    ready: Ready,
    accept_flags: SocketFlags,
    /// Slots that reached their connection limit (recycled by the supervisor).
    pub(crate) due: Vec<usize>,
    /// Dead workers' ends of their channels, still holding connections to read back.
    pub(crate) orphans: Vec<crate::channel::Channel>,
    /// A spare fd, closed for a moment before each read of an orphaned queue.
    pub(crate) reserve: Option<OwnedFd>,
}

impl Dispatch {
    pub(crate) fn new(
        listeners: Vec<Listener>,
        max_workers: usize,
        in_flight: usize,
        nonblocking: bool,
    ) -> Dispatch {
        Dispatch {
            listeners,
            armed: true,
            rearm_at: None,
            pending: VecDeque::with_capacity(PENDING_MAX + max_workers * in_flight),
            ready: Ready::new(max_workers),
            accept_flags: if nonblocking {
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK
            } else {
                SocketFlags::CLOEXEC
            },
            due: Vec::with_capacity(max_workers),
            orphans: Vec::with_capacity(max_workers),
            reserve: None,
        }
    }
}

impl Primary {
    /// A listener is readable: accept up to the budget and hand each connection out.
    pub(super) fn on_listener(&mut self, i: usize) {
        if !self.dispatch.armed || i >= self.dispatch.listeners.len() {
            return;
        }
        for _ in 0..ACCEPT_BUDGET {
            if self.dispatch.pending.len() >= PENDING_MAX {
                self.disarm(None);
                return;
            }
            let d = &self.dispatch;
            match rustix::net::accept_with(&d.listeners[i].fd, d.accept_flags) {
                Ok(fd) => {
                    if self.dispatch.pending.is_empty() {
                        if let Err(back) = self.dispatch(fd, i as u16) {
                            self.dispatch.pending.push_back(back);
                        }
                    } else {
                        self.dispatch.pending.push_back((fd, i as u16));
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

    /// Takes the listeners out of epoll; with an error, for a pause that ends by itself.
    fn disarm(&mut self, error: Option<Error>) {
        if self.dispatch.armed {
            self.dispatch.armed = false;
            if let Some(ep) = &self.epoll {
                for l in &self.dispatch.listeners {
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
            self.dispatch.rearm_at = Some(at);
            self.arm_tick(at);
        }
    }

    /// Puts the listeners back into epoll.
    pub(super) fn rearm(&mut self) {
        if self.dispatch.armed
            || !self.sup.running()
            || self.settings.schedule != Schedule::RoundRobin
        {
            return;
        }
        self.dispatch.armed = true;
        self.dispatch.rearm_at = None;
        let Some(ep) = &self.epoll else { return };
        for (i, l) in self.dispatch.listeners.iter().enumerate() {
            let _ = epoll::modify(
                ep,
                &l.fd,
                epoll::EventData::new_u64(TAG_LISTENER | i as u64),
                epoll::EventFlags::IN,
            );
        }
    }

    /// Hands `fd` to the next ready worker; gives it back when none can take it.
    fn dispatch(&mut self, fd: OwnedFd, li: u16) -> core::result::Result<(), (OwnedFd, u16)> {
        while let Some((slot, gen)) = self.dispatch.ready.pop() {
            let Some(w) = self.table.get_gen(slot, gen) else {
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
                    if w.dispatched == w.max_conns {
                        self.dispatch.due.push(slot);
                    }
                    if w.state == State::Listening && !w.leaving {
                        w.in_ready = true;
                        self.dispatch.ready.push(slot, gen);
                    }
                    return Ok(());
                }
                // Its queue holds as much as the in-flight bound allows: no more work for it until
                // it reads some (EPOLLOUT on its channel).
                Err(e) if e.is_would_block() => {
                    w.blocked = true;
                    watch(self.epoll.as_ref(), chan, slot, gen, true);
                }
                Err(_) => {}
            }
        }
        Err((fd, li))
    }

    /// The worker's queue drained below the bound.
    pub(super) fn on_writable(&mut self, slot: usize, gen: u32) {
        let Some(w) = self.table.get_gen(slot, gen) else {
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

    /// Hands out queued connections while workers can take them.
    pub(super) fn drain_pending(&mut self) {
        while let Some((fd, li)) = self.dispatch.pending.pop_front() {
            if let Err(back) = self.dispatch(fd, li) {
                self.dispatch.pending.push_front(back);
                break;
            }
        }
        let d = &self.dispatch;
        if !d.armed && d.rearm_at.is_none() && d.pending.len() < PENDING_MAX / 2 {
            self.rearm();
        }
    }

    /// The worker in `slot` can take work (listening, not leaving, queue not full).
    pub(super) fn make_ready(&mut self, slot: usize) {
        let gen = self.table.gen(slot);
        if let Some(w) = self.table.get_mut(slot) {
            if !w.in_ready
                && !w.blocked
                && w.state == State::Listening
                && !w.leaving
                && w.status.is_none()
                && w.chan.is_some()
            {
                w.in_ready = true;
                self.dispatch.ready.push(slot, gen);
            }
        }
    }

    /// No more work for the worker in `slot`.
    pub(super) fn unready(&mut self, slot: usize) {
        if let Some(w) = self.table.get_mut(slot) {
            if w.in_ready {
                w.in_ready = false;
                self.dispatch.ready.remove(slot);
            }
        }
    }

    /// A dead worker's connections that it never received: its end of the channel joins the
    /// queues to read back, and the connections go to the other workers.
    pub(super) fn recover(&mut self, slot: usize) {
        self.unready(slot);
        if let Some(peer) = self.table.get_mut(slot).and_then(|w| w.peer.take()) {
            self.dispatch.orphans.push(peer);
            self.drain_orphans();
        }
    }

    /// Reads connections back from dead workers' queues into `pending`. Each frame is read
    /// with the reserve fd closed first, so that its connection always has a free fd to land
    /// in: at `EMFILE` the reserve cannot be made again, and reading stops (the rest waits in
    /// the queue, nothing is truncated) until a tick finds fds free again.
    pub(super) fn drain_orphans(&mut self) {
        while let Some(peer) = self.dispatch.orphans.last() {
            if self.dispatch.reserve.is_none() {
                match self.make_reserve() {
                    Some(r) => self.dispatch.reserve = Some(r),
                    None => return,
                }
            }
            self.dispatch.reserve = None;
            let got = peer.try_recv(&mut self.rbuf);
            let done = match got {
                Ok(Some(mut r)) => {
                    if r.frame.kind() == Kind::Connection {
                        if let Some(fd) = r.fds.pop() {
                            self.dispatch
                                .pending
                                .push_back((fd, r.frame.listener().unwrap_or(0)));
                            self.events.stats.recovered += 1;
                        }
                    }
                    false
                }
                Ok(None) | Err(Error::Closed) => true,
                // Our own frames always decode; anything else (a message to the dead worker
                // whose fds did not fit) is dropped.
                Err(_) => false,
            };
            if done {
                self.dispatch.orphans.pop();
            }
            self.dispatch.reserve = self.make_reserve();
        }
    }

    /// A spare fd (a duplicate of the epoll fd), `None` at `EMFILE`.
    pub(super) fn make_reserve(&self) -> Option<OwnedFd> {
        let ep = self.epoll.as_ref()?;
        rustix::io::fcntl_dupfd_cloexec(ep, 0).ok()
    }

    /// The cluster stops accepting: what the kernel already accepted is taken and handed out,
    /// so that nothing in the backlog is reset, and the listeners leave epoll.
    pub(super) fn close_listeners(&mut self) {
        if self.settings.schedule == Schedule::RoundRobin && self.dispatch.armed {
            let d = &mut self.dispatch;
            for i in 0..d.listeners.len() {
                while let Ok(fd) = rustix::net::accept_with(&d.listeners[i].fd, d.accept_flags) {
                    d.pending.push_back((fd, i as u16));
                }
            }
            self.drain_pending();
        }
        self.dispatch.armed = false;
        if let Some(ep) = &self.epoll {
            for l in &self.dispatch.listeners {
                let _ = epoll::delete(ep, &l.fd);
            }
        }
        // Connections accepted before the stop that no worker could take yet (every queue at
        // its bound) are handed out past the bound: they were accepted, so they are answered.
        // A worker whose queue stays full for a second does not get them.
        let until = Instant::now() + Duration::from_secs(1);
        'conns: while let Some((fd, li)) = self.dispatch.pending.pop_front() {
            let idx = li.to_le_bytes();
            loop {
                for (_, w) in self.table.iter() {
                    let Some(chan) = w.chan.as_ref().filter(|_| w.state == State::Listening) else {
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
        self.dispatch.pending.clear();
    }
}
