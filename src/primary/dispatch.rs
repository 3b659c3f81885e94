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

use arrayvec::ArrayVec;
use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;

use super::events::Ev;
use super::schedule::{Dense, Ready};
use super::table::{watch, State, TAG_LISTENER, TAG_SEAT};
use super::Primary;
use crate::error::Error;
use crate::frame::{Frame, Kind};
use crate::listener::{self, Family, Listener};
use crate::settings::Schedule;

/// Accepted connections the primary queues while no worker can take one; past this it stops
/// accepting and lets the kernel's backlog hold the rest.
pub(crate) const PENDING_MAX: usize = 1024;
/// Connections accepted per listener wakeup before the loop looks at other fds.
const ACCEPT_BUDGET: usize = 64;
/// How long accepting pauses after `EMFILE` and the like.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A connection waiting for a worker: its fd, its listener's index, and (sticky) the key of
/// the client's address.
pub(crate) type Queued = (OwnedFd, u16, u64);

/// Where the primary accepts from.
#[derive(Debug, Clone, Copy)]
enum Src {
    /// The cluster's listener (hand-off schedules).
    Listener(usize),
    /// A reuseport seat's socket for a listener, while nobody takes the seat.
    Seat(u32, usize),
}

/// The epoll token of a seat's socket.
pub(crate) fn seat_token(seat: u32, li: usize) -> epoll::EventData {
    epoll::EventData::new_u64(TAG_SEAT | u64::from(seat) << 8 | li as u64)
}

/// The sticky key of a client address: its IP (not its port), IPv4-mapped IPv6 as IPv4.
fn client_key(a: Option<rustix::net::SocketAddrAny>) -> u64 {
    match a.and_then(|a| std::net::SocketAddr::try_from(a).ok()) {
        Some(std::net::SocketAddr::V4(v4)) => u64::from(u32::from(*v4.ip())),
        Some(std::net::SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4)),
            None => {
                let b = u128::from(*v6.ip());
                (b as u64) ^ ((b >> 64) as u64).rotate_left(17) ^ 1 << 63
            }
        },
        None => 0,
    }
}

/// The state of dispatch.
pub(crate) struct Dispatch {
    pub(crate) listeners: Vec<Listener>,
    /// The listeners are in epoll.
    armed: bool,
    /// When a pause in accepting ends.
    pub(crate) rearm_at: Option<Instant>,
    pub(crate) pending: VecDeque<Queued>,
    ready: Ready,
    /// Least connections and sticky choose from this set instead of the ring.
    pub(crate) dense: Dense,
    pub(crate) chosen: bool,
    accept_flags: SocketFlags,
    /// Slots that reached their connection limit (recycled by the supervisor).
    pub(crate) due: Vec<usize>,
    /// Dead workers' ends of their channels, still holding connections to read back.
    pub(crate) orphans: Vec<crate::channel::Channel>,
    /// A spare fd, closed for a moment before each read of an orphaned queue.
    pub(crate) reserve: Option<OwnedFd>,
    /// `Disconnect`s held back behind accepted connections (stopping).
    pub(crate) held: usize,
    /// Workers whose channel refused a hand-off with an error other than `EAGAIN`.
    pub(crate) broken: ArrayVec<(usize, u32, Error), 8>,
    /// The listen backlog (for a listener that has to listen again).
    backlog: i32,
    /// Workers held out of the ready set for a moment: at their connection limit, or they
    /// refused a connection. Looked at again at every tick.
    pub(crate) full: Vec<(usize, u32)>,
    /// `Builder::max_connections_per_worker`.
    pub(crate) max_open: Option<u32>,
}

impl Dispatch {
    /// The flags of every `accept4`.
    pub(crate) fn accept_flags(&self) -> SocketFlags {
        self.accept_flags
    }

    pub(crate) fn new(
        listeners: Vec<Listener>,
        max_workers: usize,
        in_flight: usize,
        nonblocking: bool,
        backlog: i32,
        schedule: Schedule,
        seed: u64,
    ) -> Dispatch {
        let chosen = matches!(schedule, Schedule::LeastConnections | Schedule::Sticky);
        Dispatch {
            listeners,
            armed: true,
            rearm_at: None,
            // Recovered connections may go past this (rarely: an allocation off the hot path).
            pending: VecDeque::with_capacity((PENDING_MAX + max_workers * in_flight).min(1 << 16)),
            ready: Ready::new(if chosen { 0 } else { max_workers }),
            dense: Dense::new(if chosen { max_workers } else { 0 }, seed),
            chosen,
            accept_flags: if nonblocking {
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK
            } else {
                SocketFlags::CLOEXEC
            },
            due: Vec::with_capacity(max_workers),
            orphans: Vec::with_capacity(max_workers),
            reserve: None,
            held: 0,
            broken: ArrayVec::new(),
            backlog,
            full: Vec::with_capacity(max_workers),
            max_open: None,
        }
    }
}

impl Primary {
    /// A listener is readable: accept up to the budget and hand each connection out.
    pub(super) fn on_listener(&mut self, i: usize) {
        if i < self.dispatch.listeners.len() {
            self.accept_from(Src::Listener(i));
        }
    }

    /// A reuseport seat nobody takes has connections: the primary hands them out.
    pub(super) fn on_seat(&mut self, seat: u32, li: usize) {
        if self.seats.polled.get(seat as usize) == Some(&true) {
            self.accept_from(Src::Seat(seat, li));
        }
    }

    fn src_fd(&self, src: Src) -> Option<&OwnedFd> {
        match src {
            Src::Listener(i) => self.dispatch.listeners.get(i)?.fd.as_ref(),
            Src::Seat(seat, li) => self.seats.sock(seat, li),
        }
    }

    fn accept_from(&mut self, src: Src) {
        if !self.dispatch.armed {
            return;
        }
        let li = match src {
            Src::Listener(i) | Src::Seat(_, i) => i as u16,
        };
        let sticky = self.settings.schedule == Schedule::Sticky;
        for _ in 0..ACCEPT_BUDGET {
            if self.dispatch.pending.len() >= PENDING_MAX {
                self.disarm(None);
                return;
            }
            let Some(lfd) = self.src_fd(src) else {
                return;
            };
            let flags = self.dispatch.accept_flags;
            let got = if sticky {
                // The client's address picks the seat (no extra system call: accept4 fills it).
                rustix::net::acceptfrom_with(lfd, flags).map(|(fd, a)| (fd, client_key(a)))
            } else {
                rustix::net::accept_with(lfd, flags).map(|fd| (fd, 0))
            };
            match got {
                Ok((fd, key)) => {
                    if self.dispatch.pending.is_empty() {
                        if let Err(back) = self.dispatch(fd, li, key) {
                            self.dispatch.pending.push_back(back);
                        }
                    } else {
                        self.dispatch.pending.push_back((fd, li, key));
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

    /// Accepting is on (not paused).
    pub(super) fn dispatch_armed(&self) -> bool {
        self.dispatch.armed
    }

    /// Takes the listeners out of epoll; with an error, for a pause that ends by itself.
    fn disarm(&mut self, error: Option<Error>) {
        if self.dispatch.armed {
            self.dispatch.armed = false;
            if let Some(ep) = &self.epoll {
                let seats = self.seats.polled_socks();
                let hands_off = self.settings.schedule.hands_off();
                let listeners = self.dispatch.listeners.iter().filter(|_| hands_off);
                for fd in listeners
                    .filter_map(|l| l.fd.as_ref())
                    .chain(seats.map(|(_, fd)| fd))
                {
                    let _ = epoll::modify(
                        ep,
                        fd,
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
        if self.dispatch.armed || !self.sup.running() {
            return;
        }
        self.dispatch.armed = true;
        self.dispatch.rearm_at = None;
        let Some(ep) = &self.epoll else { return };
        if self.settings.schedule.hands_off() {
            for (i, l) in self.dispatch.listeners.iter().enumerate() {
                let Some(fd) = &l.fd else { continue };
                let _ = epoll::modify(
                    ep,
                    fd,
                    epoll::EventData::new_u64(TAG_LISTENER | i as u64),
                    epoll::EventFlags::IN,
                );
            }
        }
        for ((seat, li), fd) in self.seats.polled_socks() {
            let _ = epoll::modify(ep, fd, seat_token(seat, li), epoll::EventFlags::IN);
        }
    }

    /// Hands `fd` to the next ready worker; gives it back when none can take it.
    fn dispatch(&mut self, mut fd: OwnedFd, li: u16, key: u64) -> core::result::Result<(), Queued> {
        if self.dispatch.chosen {
            return self.dispatch_chosen(fd, li, key);
        }
        while let Some((slot, gen, stamp)) = self.dispatch.ready.pop() {
            let Some(w) = self.table.get_gen(slot, gen) else {
                continue;
            };
            if !w.in_ready || w.ready_stamp != stamp {
                continue;
            }
            w.in_ready = false;
            let dispatched = w.dispatched;
            if self.dispatch.max_open.is_some() && self.at_limit(slot, dispatched) {
                // Its entry was taken: held back, it returns at a tick below its limit.
                if let Some(w) = self.table.get_mut(slot) {
                    w.in_ready = true;
                }
                self.hold_back(slot);
                continue;
            }
            match self.hand_over(slot, gen, fd, li) {
                Ok(()) => {
                    if let Some(w) = self.table.get_mut(slot) {
                        if w.state == State::Listening && (!w.leaving || w.disconnect_pending) {
                            // Its own entry was just taken: there is room for it.
                            w.in_ready = self.dispatch.ready.push(slot, gen, stamp);
                        }
                    }
                    return Ok(());
                }
                // Out of the ring already (its entry was taken): the next one is tried.
                Err(back) => fd = back,
            }
        }
        Err((fd, li, key))
    }

    /// Sends `fd` to the worker in `slot` (at generation `gen`): counted, and due for recycling
    /// at its limit. `Err(fd)` when it cannot take it: its queue holds as much as the in-flight
    /// bound allows (it is marked blocked and gets work again on EPOLLOUT), its channel is
    /// gone, or the channel refused with an error other than `EAGAIN` (EPIPE: the worker shut
    /// it down for reading; a protocol error, handled after this dispatch). The caller takes
    /// it out of its ready set.
    #[inline]
    pub(super) fn hand_over(
        &mut self,
        slot: usize,
        gen: u32,
        fd: OwnedFd,
        li: u16,
    ) -> core::result::Result<(), OwnedFd> {
        let Some(w) = self.table.get_gen(slot, gen) else {
            return Err(fd);
        };
        let Some(chan) = w.chan.as_ref() else {
            return Err(fd);
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
                Ok(())
            }
            Err(e) if e.is_would_block() => {
                w.blocked = true;
                watch(self.epoll.as_ref(), chan, slot, gen, true);
                Err(fd)
            }
            Err(e) => {
                // (With the list full it stays out of the ready set, unreported.)
                let _ = self.dispatch.broken.try_push((slot, gen, e));
                Err(fd)
            }
        }
    }

    /// The worker's queue drained below the bound.
    pub(super) fn on_writable(&mut self, slot: usize, gen: u32) {
        let Some(w) = self.table.get_gen(slot, gen) else {
            return;
        };
        if !w.blocked {
            return;
        }
        let hold = !self.sup.running() && !self.dispatch.pending.is_empty();
        if w.disconnect_pending && !hold {
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
        while let Some((fd, li, key)) = self.dispatch.pending.pop_front() {
            if let Err(back) = self.dispatch(fd, li, key) {
                self.dispatch.pending.push_front(back);
                break;
            }
        }
        let d = &self.dispatch;
        if d.held > 0 && d.pending.is_empty() {
            self.flush_disconnects();
        }
        let d = &self.dispatch;
        if !d.armed && d.rearm_at.is_none() && d.pending.len() < PENDING_MAX / 2 {
            self.rearm();
        }
    }

    /// The worker in `slot` can take work (listening, not leaving, queue not full).
    pub(super) fn make_ready(&mut self, slot: usize) {
        let gen = self.table.gen(slot);
        let Some(w) = self.table.get(slot) else {
            return;
        };
        if w.in_ready
            || w.held_back
            || w.blocked
            || w.state != State::Listening
            || (w.leaving && !w.disconnect_pending)
            || w.status.is_some()
            || w.chan.is_none()
        {
            return;
        }
        let stamp = w.ready_stamp;
        if self.dispatch.chosen {
            if self.dispatch.dense.insert(slot, gen) {
                if let Some(w) = self.table.get_mut(slot) {
                    w.in_ready = true;
                }
            }
            return;
        }
        if !self.dispatch.ready.push(slot, gen, stamp) {
            let table = &self.table;
            self.dispatch.ready.compact(|s, g, t| {
                table
                    .get(s)
                    .is_some_and(|w| table.gen(s) == g && w.in_ready && w.ready_stamp == t)
            });
            if !self.dispatch.ready.push(slot, gen, stamp) {
                return;
            }
        }
        if let Some(w) = self.table.get_mut(slot) {
            w.in_ready = true;
        }
    }

    /// No more work for the worker in `slot`: O(1), its entry in the ready ring goes stale.
    /// (Called when a worker leaves, hangs or dies: it also stands up from its seat.)
    pub(super) fn unready(&mut self, slot: usize) {
        self.stand_up(slot);
        if let Some(w) = self.table.get_mut(slot) {
            if w.in_ready {
                w.in_ready = false;
                w.ready_stamp = w.ready_stamp.wrapping_add(1);
                self.dispatch.dense.remove(slot);
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
                            self.dispatch.pending.push_back((
                                fd,
                                r.frame.listener().unwrap_or(0),
                                0,
                            ));
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

    /// The cluster stops accepting: what the kernel already accepted is taken (up to
    /// [`PENDING_MAX`] per listener: a connect flood cannot hold the stop up) and handed out as
    /// workers have room, so that nothing in the backlog is reset; the listeners are closed, so
    /// new clients are refused at once. While accepted connections wait, the `Disconnect` of a
    /// stopping worker waits behind them (see `send_disconnect`), and every one is answered by
    /// a worker that reads its queue before its graceful timeout.
    pub(super) fn close_listeners(&mut self) {
        if self.settings.schedule.hands_off() {
            let d = &mut self.dispatch;
            for i in 0..d.listeners.len() {
                let Some(lfd) = d.listeners[i].fd.as_ref() else {
                    continue;
                };
                for _ in 0..PENDING_MAX {
                    match rustix::net::accept_with(lfd, d.accept_flags) {
                        Ok(fd) => d.pending.push_back((fd, i as u16, 0)),
                        Err(Errno::INTR) | Err(Errno::CONNABORTED) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        // Reuseport: what waits in every seat's backlog is taken too, and the primary's
        // copies closed (a seat's worker keeps its copy until its `Disconnect`).
        for s in 0..self.seats.len() {
            self.drain_seat(s);
            self.unpoll_seat(s as u32);
            self.seats.close(s);
        }
        self.dispatch.armed = false;
        self.dispatch.rearm_at = None;
        if let Some(ep) = &self.epoll {
            for l in &self.dispatch.listeners {
                if let Some(fd) = &l.fd {
                    let _ = epoll::delete(ep, fd);
                }
            }
        }
        // Closed: new clients are refused at once, and the port or path is free for a new
        // cluster. (In the shared schedule the workers hold the socket until they disconnect.)
        for l in self.dispatch.listeners.iter_mut() {
            l.fd = None;
            listener::unlink(l);
        }
        self.drain_pending();
    }

    /// Shared schedule: a worker can `shutdown(SHUT_RD)` the listener every worker shares,
    /// which makes a TCP socket stop listening for all of them. At each tick the primary checks
    /// its copy (`SO_ACCEPTCONN`) and has it listen again. (A Unix socket shut down this way
    /// keeps refusing connections until the cluster restarts: Linux has no way back for it.)
    pub(super) fn check_listeners(&mut self) {
        if !self.settings.schedule.workers_accept() || !self.sup.running() {
            return;
        }
        let reuseport = self.settings.schedule == Schedule::ReusePort;
        for l in &self.dispatch.listeners {
            let Some(fd) = &l.fd else { continue };
            if l.family != Family::Tcp
                || (reuseport && rustix::net::sockopt::socket_reuseport(fd).unwrap_or(false))
                || rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(true)
            {
                // (Reuseport: seat 0's socket, which `check_seats` looks after.)
                continue;
            }
            // A socket bound to port 0 gives its port back when it is shut down: listening
            // again would pick another port, so it stays shut (as a Unix listener does).
            // Reuseport binds every socket to its port, so this is only the shared schedule's.
            let port = |a: &crate::listener::ListenAddr| match a {
                crate::listener::ListenAddr::Tcp(a) => a.port(),
                _ => 0,
            };
            let bound = rustix::net::getsockname(fd)
                .ok()
                .and_then(|a| std::net::SocketAddr::try_from(a).ok())
                .map_or(0, |a| a.port());
            if bound == port(&l.addr) && rustix::net::listen(fd, self.dispatch.backlog).is_ok() {
                self.events.stats.listeners_restored += 1;
            }
        }
    }

    /// While the cluster stops, a worker's `Disconnect` waits until no accepted connection
    /// does: such a worker still takes them.
    pub(super) fn hold_disconnect(&self) -> bool {
        !self.sup.running() && !self.dispatch.pending.is_empty()
    }

    /// Sends the `Disconnect`s that waited for the accepted connections to be handed out.
    fn flush_disconnects(&mut self) {
        self.dispatch.held = 0;
        let mut slots: ArrayVec<usize, 64> = ArrayVec::new();
        loop {
            slots.clear();
            for (slot, w) in self.table.iter() {
                if w.disconnect_pending && !w.blocked && slots.try_push(slot).is_err() {
                    break;
                }
            }
            if slots.is_empty() {
                return;
            }
            for &slot in &slots {
                if let Some(w) = self.table.get_mut(slot) {
                    w.disconnect_pending = false;
                }
                self.send_disconnect(slot);
            }
        }
    }
}
